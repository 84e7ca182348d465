#!/usr/bin/env python
"""Data feed: data tokens/s the loader delivers vs what a phase-1 step consumes on a GPU.

    python scripts/bench_data.py                  # ~2 min on 2 CPU cores
    python scripts/bench_data.py --seconds 3 --vocab 4096 --seq-len 512   # quick

Phase-1 batches (``s*(L+1)`` stream tokens per sample), tokenized on the fly and read
from a token store, with 0, 1 and 2 dataloader workers, against torchtitan's FLOPs per
position of each paper shape at the stated MFU and peak. Method: tst_titan/bench/data.py.
"""

from __future__ import annotations

import os

# Offline before huggingface_hub and datasets are imported (both read these once): the
# benchmark uses only the embedded corpus and a locally trained tokenizer.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse  # noqa: E402
import sys  # noqa: E402

from tst_titan.bench.data import FeedConfig, run_feed_bench  # noqa: E402
from tst_titan.errors import USER_ERRORS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = FeedConfig()
    p.add_argument("--vocab", type=int, default=defaults.vocab,
                   help="embedded BPE vocabulary (>= 32k: a real-size tokenizer)")
    p.add_argument("--seq-len", type=int, default=defaults.seq_len)
    p.add_argument("--bag", type=int, default=defaults.bag)
    p.add_argument("--batch", type=int, default=defaults.batch,
                   help="samples per batch (the 270M config's microbatch)")
    p.add_argument("--seconds", type=float, default=defaults.seconds, help="timed seconds per row")
    p.add_argument("--workers", type=int, nargs="+", default=defaults.workers)
    p.add_argument("--mfu", type=float, default=defaults.mfu)
    p.add_argument("--peak-tflops", type=float, default=defaults.peak_tflops, help="H100/H200 bf16 dense peak")
    p.add_argument("--store", default=None,
                   help="an existing store of the embedded corpus (else made in a temp dir)")
    args = p.parse_args(argv)
    cfg = FeedConfig(vocab=args.vocab, seq_len=args.seq_len, bag=args.bag, batch=args.batch,
                     seconds=args.seconds, workers=args.workers, mfu=args.mfu, peak_tflops=args.peak_tflops)
    try:
        report = run_feed_bench(cfg, args.store, log=lambda line: print(line, flush=True))
    except USER_ERRORS as e:
        print(f"bench_data: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(report.summary_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
