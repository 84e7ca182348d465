#!/usr/bin/env python
"""Downstream scores of a run with EleutherAI's lm-evaluation-harness, as in the paper.

    # an export written by scripts/export_hf.py
    python scripts/eval_lm.py --hf outputs/tst_debug_cpu/hf
    # a DCP checkpoint: exported first, to <run>/lm_eval/hf-step-N
    python scripts/eval_lm.py --config train_configs/tst_debug_cpu.toml \\
        --checkpoint outputs/tst_debug_cpu/checkpoint/step-300
    # offline: the tasks shipped with tst_titan (held-out bits per byte, tiny multiple choice)
    python scripts/eval_lm.py --hf outputs/tst_debug_cpu/hf --tasks local

Zero-shot, the paper's tasks by default (arc_easy, arc_challenge, boolq, hellaswag,
openbookqa, piqa, winogrande; ``--mmlu`` adds MMLU). Writes lm-eval's results JSON to
``<run>/lm_eval/results.json`` (or ``--out``), which scripts/compare_runs.py reads.
Context length: the run's training seq_len. cuda when available (bfloat16, automatic
batch size), else CPU (float32, batch 8). Task data not cached and the hub out of reach:
one line naming the task, exit status 2. Needs ``pip install -e ".[eval]"``; see
docs/EVALUATION.md.
"""

from __future__ import annotations

import argparse
import sys

from tst_titan.errors import USER_ERRORS, EvalError
from tst_titan.export import model_source_error


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf", help="a Hugging Face model directory (scripts/export_hf.py's output)")
    ap.add_argument("--checkpoint", help="a DCP folder <run>/checkpoint/step-N (needs --config)")
    ap.add_argument("--config", help="the run's TOML (with --checkpoint)")
    ap.add_argument("--tasks", default="paper",
                    help="comma-separated lm-eval tasks; 'paper' and 'local' name the two sets (default: paper)")
    ap.add_argument("--mmlu", action="store_true", help="add MMLU (57 subjects, zero-shot)")
    ap.add_argument("--include-path", action="append", default=[], help="another folder of lm-eval task YAMLs")
    ap.add_argument("--out", help="results folder (default: <run>/lm_eval)")
    ap.add_argument("--device", help="default: cuda if available, else cpu")
    ap.add_argument("--batch-size", help="an integer or 'auto' (default: auto on cuda, 8 on CPU)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on cuda, float32 on CPU")
    ap.add_argument("--max-length", type=int, help="context length (default: the run's training seq_len)")
    ap.add_argument("--limit", type=float, help="at most this many items per task (a smoke test, not a score)")
    ap.add_argument("overrides", nargs="*", help="torchtitan CLI overrides for --config, after --")
    args = ap.parse_args(argv)
    source_error = model_source_error(args.checkpoint, args.hf, args.config)
    if source_error:
        ap.error(source_error)
    batch_size = args.batch_size
    if batch_size is not None and batch_size != "auto" and not batch_size.isdigit():
        ap.error("--batch-size: an integer or 'auto'")
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)

    try:
        from tst_titan import lm_eval as tl
    except ImportError as e:
        print(f"eval_lm: error: lm-eval is not installed ({e}): pip install -e '.[eval]'", file=sys.stderr)
        return 2
    try:
        out = tl.results_folder(args.checkpoint or args.hf, args.out)
        tasks = tl.expand_tasks([t.strip() for t in args.tasks.split(",") if t.strip()], args.mmlu)
        tm = tl.task_manager(tasks, args.include_path)
        tl.check_tasks(tm, tasks)
        if args.checkpoint:
            model_dir = tl.export_checkpoint(args.config, args.checkpoint, args.overrides, out)
        else:
            model_dir = args.hf
        max_length = args.max_length or tl.trained_seq_len(model_dir)
        if max_length is None:
            raise EvalError(f"--hf {args.hf}: no training seq_len in tst_export.json; give --max-length")
        bs = None if batch_size is None else (batch_size if batch_size == "auto" else int(batch_size))
        settings = tl.settings_for(max_length, args.device, bs, args.dtype)
        print(f"eval_lm: {model_dir}: {', '.join(tasks)}, zero-shot, {settings}", file=sys.stderr, flush=True)
        results = tl.evaluate(model_dir, tasks, settings, tm, limit=limit)
    except USER_ERRORS as e:
        print(f"eval_lm: error: {e}", file=sys.stderr)
        return 2
    path = tl.write_results(results, out)
    print(tl.results_table(results))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
