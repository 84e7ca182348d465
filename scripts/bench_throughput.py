#!/usr/bin/env python
"""Phase-1 TST steps against plain steps of the same model and sequence length.

In one process, alternating, it times full training steps (forward, backward, AdamW)
of a plain next-token batch [B, L] and of a superposition batch [B, L, s] and prints:
data tokens/s TST / plain (the limit is s), positions/s TST / plain (the limit is 1.0),
peak memory TST / plain (CUDA only), and the share of step time spent in the bag
embedding and in the multi-hot loss.

    python scripts/bench_throughput.py                       # debug flavor, CPU or GPU
    python scripts/bench_throughput.py --flavor 270M --seq-len 2048 --batch 8   # on a GPU

Precision follows single-device torchtitan training (``--precision bf16``, the default
on CUDA): fp32 parameters, bf16 compute under torchtitan's autocast; see
tst_titan/bench/throughput.py.
"""

from __future__ import annotations

import argparse
import sys

import torch

from tst_titan.bench.throughput import PRECISIONS, measure_throughput
from tst_titan.errors import USER_ERRORS
from tst_titan.specs import tst_llama3_flavors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="debug", choices=sorted(tst_llama3_flavors))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--bag", type=int, default=6)
    p.add_argument("--steps", type=int, default=8, help="timed steps of each kind")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="bf16: fp32 weights + bf16 autocast, as torchtitan on one device "
                        "(default on CUDA); fp32 (default on CPU)")
    args = p.parse_args(argv)
    try:
        result = measure_throughput(args.flavor, args.seq_len, args.batch, args.bag, args.steps,
                                    torch.device(args.device), args.precision)
    except USER_ERRORS as e:
        print(f"bench_throughput: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(result.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
