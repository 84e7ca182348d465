"""Entry point: ``torchrun --nproc_per_node N -m tst_titan.train --job.config_file X.toml``.

It follows torchtitan's own ``torchtitan.train.main`` step by step, with three
additions: the CPU shims when no CUDA device exists, our ``[tst]``/``[data]`` config
sections merged without the user passing ``--job.custom_config_module``, and the TST
trainer. Every torchtitan option and CLI override keeps working. A configuration,
data or checkpoint-mismatch error ends the run with a one-line message and exit code
2 before any training step.
"""

from __future__ import annotations

import logging
import os
import sys

from tst_titan.device import apply_cpu_shims, skip_final_sleep

apply_cpu_shims()

import torch  # noqa: E402
from torchtitan.config import ConfigManager, JobConfig  # noqa: E402
from torchtitan.tools.logging import init_logger, logger  # noqa: E402

from tst_titan import config as tst_config  # noqa: E402
from tst_titan.errors import USER_ERRORS  # noqa: E402
from tst_titan.trainer import TSTTrainer  # noqa: E402


# The two ways to place the switch; a run gives one (tst_titan.checks.check_tst).
_SWITCH_KEYS = ("superposition_ratio", "switch_step")


def _cli_sets(argv: list[str], key: str) -> bool:
    """Whether ``argv`` gives ``--tst.<key>`` (``_`` or ``-``, ``--k v`` or ``--k=v``)."""
    names = {f"--tst.{key}", f"--tst.{key.replace('_', '-')}"}
    return any(a.split("=", 1)[0] in names for a in argv)


class _EmbeddedIsNotAPath(logging.Filter):
    """torchtitan warns "HF assets path embedded does not exist!" on every parse: for us
    ``embedded`` names the built-in tokenizer, not a folder, so that warning only misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("HF assets path embedded does not exist")


_EMBEDDED_FILTER = _EmbeddedIsNotAPath()


def parse_config(argv: list[str]) -> JobConfig:
    """torchtitan's TOML + CLI parsing with the ``[tst]`` and ``[data]`` sections.

    ``tst.superposition_ratio`` and ``tst.switch_step`` are two spellings of one
    setting, so a command-line value of either replaces the TOML's value of the other
    (``--tst.switch_step 300`` with a TOML that sets a ratio). Both given in the TOML,
    or both on the command line, stay an error for ``check_tst``.
    """
    logger.addFilter(_EMBEDDED_FILTER)  # idempotent: a logger holds a filter once
    merged = ConfigManager._merge_configs(JobConfig, tst_config.JobConfig)
    manager = ConfigManager(config_cls=merged)
    config = manager.parse_args(argv)
    on_cli = [k for k in _SWITCH_KEYS if _cli_sets(argv, k)]
    in_toml = [k for k in _SWITCH_KEYS if k in ((manager._maybe_load_toml(argv) or {}).get("tst") or {})]
    if len(on_cli) == 1 and len(in_toml) < 2:
        other = next(k for k in _SWITCH_KEYS if k != on_cli[0])
        setattr(config.tst, other, None)  # not on the CLI: the TOML's value (or the default None)
    return config


def main(argv: list[str] | None = None) -> None:
    init_logger()
    argv = sys.argv[1:] if argv is None else argv
    trainer = None
    try:
        config = parse_config(argv)
        trainer = TSTTrainer(config)
        if config.checkpoint.create_seed_checkpoint:
            assert int(os.environ["WORLD_SIZE"]) == 1, "seed checkpoints need one process"
            assert config.checkpoint.enable, "seed checkpoints need checkpoint.enable"
            trainer.checkpointer.save(curr_step=0, last_step=True)
            logger.info("Created seed checkpoint")
        else:
            skip_final_sleep()  # torchtitan's rank 0 sleeps 2 s at the end; we barrier below
            trainer.train()
    except USER_ERRORS as e:
        if trainer is not None:
            trainer.close()
        print(f"tst-titan: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Exception:
        if trainer is not None:
            trainer.close()
        raise
    trainer.close()
    if torch.distributed.is_initialized():
        # Leave together: a rank tearing gloo down while a peer is still finishing
        # (torchtitan's rank 0 sleeps 2 s at the end) can abort at interpreter exit.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    logger.info("Process group destroyed")


if __name__ == "__main__":
    main()
