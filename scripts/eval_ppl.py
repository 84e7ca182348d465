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
import dataclasses
import sys
from pathlib import Path

from tst_titan.analysis.jsonio import write_json_atomic
from tst_titan.errors import USER_ERRORS
from tst_titan.evaluate import evaluate_model, load_eval_model
from tst_titan.export import model_source_error


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
    problem = model_source_error(args.checkpoint, args.hf, args.config)
    if problem:
        ap.error(problem)
    try:
        model = load_eval_model(args.checkpoint, args.hf, args.config, args.overrides)
        result, seq_len = evaluate_model(model, args.seq_len, args.max_tokens, args.batch_size)
    except (*USER_ERRORS, ValueError) as e:  # ValueError: transformers on a malformed model directory
        print(f"eval_ppl: error: {e}", file=sys.stderr)
        return 2
    print(f"{model.description}, seq_len {seq_len}:\n{result.describe()}")
    if args.json:
        write_json_atomic(Path(args.json), {**dataclasses.asdict(result), "model": model.description,
                                            "seq_len": seq_len})
    return 0


if __name__ == "__main__":
    sys.exit(main())
