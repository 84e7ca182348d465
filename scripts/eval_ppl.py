#!/usr/bin/env python
"""Validation loss, perplexity and bits per byte of a checkpoint or an exported model.

    # a DCP checkpoint of a run (its TOML gives model, tokenizer and held-out data)
    python scripts/eval_ppl.py --config train_configs/tst_debug_cpu.toml \\
        --checkpoint outputs/tst_debug_cpu/checkpoint/step-300
    # a Hugging Face directory written by scripts/export_hf.py (or any causal LM)
    python scripts/eval_ppl.py --hf outputs/tst_debug_cpu/hf

Held-out data: the ``[validation]`` dataset of ``--config`` (embedded, local files or a
hub dataset, as in training), or the embedded corpus's validation split when only
``--hf`` is given. See tst_titan/evaluate.py for the exact definitions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def held_out_documents(job_config):
    from tst_titan.config import Data
    from tst_titan.data.sources import build_source

    if job_config is None:
        return build_source("embedded", None, "validation", 0, 1, Data(), loop=False)
    v = job_config.validation
    return build_source(
        v.dataset, v.dataset_path, "validation", 0, 1, job_config.data, loop=False, key_prefix="validation"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="the run's TOML (needed with --checkpoint)")
    ap.add_argument("--checkpoint", help="a DCP folder <dump>/checkpoint/step-N")
    ap.add_argument("--hf", help="a Hugging Face model directory instead of a checkpoint")
    ap.add_argument("--seq-len", type=int, help="window length (default: training.seq_len, or 2048)")
    ap.add_argument("--max-tokens", type=int, default=200_000, help="stop after about this many tokens")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", help="also write the result to this JSON file")
    ap.add_argument("overrides", nargs="*", help="torchtitan CLI overrides for --config, after --")
    args = ap.parse_args(argv)
    if bool(args.checkpoint) == bool(args.hf):
        ap.error("give exactly one of --checkpoint and --hf")
    if args.checkpoint and not args.config:
        ap.error("--checkpoint needs --config (the run's TOML)")

    import torch
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    from tst_titan.checkpoint import CheckpointError
    from tst_titan.errors import ConfigError
    from tst_titan.errors import DataError
    from tst_titan.evaluate import evaluate

    try:
        job_config = None
        if args.checkpoint:
            from tst_titan.export import load_checkpoint_model

            loaded = load_checkpoint_model(args.config, args.checkpoint, args.overrides)
            job_config, model, tok_dir = loaded.job_config, loaded.model, loaded.tokenizer_dir
            logits_fn = model
            what = f"checkpoint {args.checkpoint} (step {loaded.step}, switch after {loaded.switch_step})"
        else:
            from transformers import AutoModelForCausalLM

            if not (Path(args.hf) / "config.json").is_file():
                raise CheckpointError(f"--hf {args.hf}: no config.json (not a Hugging Face model directory)")
            if args.config:
                from tst_titan.train import parse_config

                job_config = parse_config(["--job.config_file", args.config, *args.overrides])
            model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
            tok_dir = args.hf
            logits_fn = lambda ids: model(ids).logits  # noqa: E731
            what = f"Hugging Face model {args.hf}"
        seq_len = args.seq_len or (job_config.training.seq_len if job_config else 2048)
        tokenizer = HuggingFaceTokenizer(tok_dir)
        encode = lambda text: tokenizer.encode(text, add_bos=True, add_eos=True)  # noqa: E731
        result = evaluate(
            logits_fn, encode, held_out_documents(job_config), seq_len,
            max_tokens=args.max_tokens, batch_size=args.batch_size,
        )
    except (ConfigError, CheckpointError, DataError, ValueError) as e:
        print(f"eval_ppl: error: {e}", file=sys.stderr)
        return 2
    print(f"{what}, seq_len {seq_len}:\n{result.describe()}")
    if args.json:
        Path(args.json).write_text(json.dumps({**result.__dict__, "model": what, "seq_len": seq_len}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
