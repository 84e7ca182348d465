#!/usr/bin/env python
"""Output projection + loss, forward and backward: stock cross-entropy vs the multi-hot
loss vs the fused (chunked) head, eager and compiled.

Every variant computes ``h [N, D] @ W.T [D, V]`` and a loss, then backward to ``h`` and
``W``, in ``--dtype`` (bf16 by default, the compute dtype under FSDP mixed precision),
each in a fresh process; errors are against a float64 reference. The variants, the
memory method and the error definitions: tst_titan/bench/loss.py.

    python scripts/bench_loss.py                                   # small, every variant
    python scripts/bench_loss.py --vocab 128256 --positions 8192 --bag 6 --json rows.json
    python scripts/bench_loss.py --no-grad --variants ce_eager,fused_eager   # validation
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tst_titan.analysis.jsonio import write_json_atomic
from tst_titan.bench.loss import VARIANTS, LossBenchConfig, VariantFailed, parse_variants, report_lines, run_variants
from tst_titan.errors import USER_ERRORS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = LossBenchConfig()
    p.add_argument("--positions", type=int, default=defaults.positions)
    p.add_argument("--vocab", type=int, default=defaults.vocab)
    p.add_argument("--dim", type=int, default=defaults.dim, help="hidden size (768: the 270M shape)")
    p.add_argument("--bag", type=int, default=defaults.bag)
    p.add_argument("--chunk", type=int, default=defaults.chunk, help="rows per chunk of the fused head")
    p.add_argument("--dtype", default=defaults.dtype, choices=["bfloat16", "float32"])
    p.add_argument("--reps", type=int, default=defaults.reps)
    p.add_argument("--device", default=defaults.device)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--max-cpu-gb", type=float, default=defaults.max_cpu_gb,
                   help="on CPU, skip variants whose estimated peak exceeds this")
    p.add_argument("--json", help="write the rows (a JSON list) here")
    p.add_argument("--no-grad", action="store_true",
                   help="forward only under torch.no_grad (validation): the loss, no backward")
    args = p.parse_args(argv)
    cfg = LossBenchConfig(positions=args.positions, vocab=args.vocab, dim=args.dim, bag=args.bag, chunk=args.chunk,
                          dtype=args.dtype, reps=args.reps, device=args.device, no_grad=args.no_grad,
                          max_cpu_gb=args.max_cpu_gb)
    try:
        rows = run_variants(cfg, parse_variants(args.variants), log=lambda line: print(line, flush=True))
    except USER_ERRORS as e:
        print(f"bench_loss: error: {e}", file=sys.stderr)
        return 2
    except VariantFailed as e:
        sys.exit(str(e))
    print("\n".join(report_lines(cfg, rows)))
    if args.json:
        write_json_atomic(Path(args.json), list(rows.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
