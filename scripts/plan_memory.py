#!/usr/bin/env python
"""Per-GPU memory plan of a config, for each TST phase, with and without tst.fused_loss.

    python scripts/plan_memory.py --config train_configs/tst_llama3_270m.toml --ngpu 8
    python scripts/plan_memory.py --config A.toml --config B.toml --ngpu 8 --markdown --json plan.json
    python scripts/plan_memory.py --config X.toml --ngpu 8 --tp 2 --phase 2 --fused off \\
        -- --training.local_batch_size 8          # any trainer override after --

No GPU needed: the model is built with the trainer's own functions on fake tensors over
a fake process group of NGPU ranks and one steady-state step of one rank runs under
PyTorch's memory tracker (tst_titan.memory_plan says what is modelled and how). Prints
one rank's peak and its parts; "fits" sets aside 3 GiB per card for memory outside tensors.

Measure instead of estimate (real tensors, allocator-level; gloo ranks on CPU, NCCL on CUDA):

    torchrun --nproc_per_node 2 scripts/plan_memory.py --measure --config tests/assets/tiny_cpu.toml --phase 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch.distributed as dist

from tst_titan.errors import USER_ERRORS
from tst_titan.memory_check import markdown_table, measure_step_memory, plan_config
from tst_titan.memory_plan import GIB, GPU_GIB, RESERVE_GIB
from tst_titan.memory_step import load_job_config

_FUSED = {"off": (False,), "on": (True,), "both": (False, True)}


def _print_estimate(name: str, e) -> None:
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in sorted(e.breakdown.items(), key=lambda kv: -kv[1]) if v)
    fits = ", ".join(f"{k}: {'fits' if e.fits(v) else 'DOES NOT FIT'}" for k, v in GPU_GIB.items())
    print(f"{name} | {e.ngpu} GPUs tp {e.tp} | phase {e.phase} | fused_loss {'on' if e.fused_loss else 'off'} | "
          f"input {list(e.input_shape)} | peak {e.peak_gib:.2f} GiB ({fits}; reserve {RESERVE_GIB} GiB)")
    print(f"    at the peak (GiB): {parts}")
    print(f"    params+grads+AdamW counted on the model: {sum(e.state_bytes.values()) / GIB:.2f} GiB; "
          f"{e.microbatches} microbatch(es) tracked; AC {e.ac_mode}" + "".join(f"; {n}" for n in e.notes))


def _measure(args, overrides: list[str]) -> int:
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        out = [measure_step_memory(load_job_config(args.config[0], overrides), phase, fused_loss=f)
               for phase in (args.phase or [2]) for f in _FUSED[args.fused]]
    finally:
        rank = dist.get_rank() if dist.is_initialized() else 0
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(out))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(out, fh, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    overrides: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", action="append", required=True, help="TOML config (repeatable)")
    ap.add_argument("--ngpu", type=int, default=8, help="ranks (GPUs) of the run (default 8)")
    ap.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default: the config's)")
    ap.add_argument("--phase", type=int, action="append", choices=[1, 2],
                    help="phase(s) to plan (default: both when tst.enable, else 2)")
    ap.add_argument("--fused", choices=list(_FUSED), default="both", help="tst.fused_loss setting(s)")
    ap.add_argument("--markdown", action="store_true", help="print the docs/RESULTS.md table")
    ap.add_argument("--json", help="write the estimates (or measurements) here")
    ap.add_argument("--measure", action="store_true",
                    help="run the step on real tensors and measure it (under torchrun for ranks > 1)")
    args = ap.parse_args(argv)
    try:
        if args.measure:
            return _measure(args, overrides)
        rows = []
        for cfg in args.config:
            for e in plan_config(cfg, args.ngpu, overrides=tuple(overrides), tp=args.tp,
                                 phases=args.phase, fused=_FUSED[args.fused]):
                name = os.path.splitext(os.path.basename(cfg))[0]
                _print_estimate(name, e)
                rows.append((name, e))
    except USER_ERRORS as e:
        print(f"tst-titan: error: {e}", file=sys.stderr)
        return 2
    if args.markdown:
        print(markdown_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([{"config": n, **e.as_dict()} for n, e in rows], fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
