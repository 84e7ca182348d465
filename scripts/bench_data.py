#!/usr/bin/env python
"""Data feed: data tokens/s the loader delivers vs what a phase-1 step consumes on a GPU.

    python scripts/bench_data.py                  # ~2 min on 2 CPU cores
    python scripts/bench_data.py --seconds 3 --vocab 4096 --seq-len 512   # quick

A TST phase-1 step reads ``s`` times the data tokens of a plain step, so the loader,
not the model, can decide the speed. This script measures phase-1 batches (the
paper-shape window: ``s*(L+1)`` tokens per sample) from two paths, with 0, 1 and 2
dataloader workers:

- on the fly: the embedded corpus tokenized in the loop (what ``dataset = "embedded"``,
  ``"local"`` and ``"hf"`` do);
- token store: the same documents prepared once with scripts/prepare_data.py and read
  from memory maps (``dataset = "store"``).

The tokenizer is the embedded byte-level BPE trained with ``--vocab`` tokens (a
stand-in for the Llama-3 tokenizer: same library, a smaller vocabulary). What a GPU
consumes comes from torchtitan's own FLOPs per position for each paper shape at the
stated MFU and peak: ``need = s * MFU * peak / flops_per_position`` data tokens/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (flavor spec, flavor, s): the paper's shapes and their bag sizes
SHAPES = [("tst_llama3", "270M", 6), ("tst_llama3", "600M", 6), ("tst_llama3", "3B", 6),
          ("tst_qwen3", "10B-A1B", 16)]


def flops_per_position(spec_name: str, flavor: str, seq_len: int) -> float:
    import torch
    from torchtitan.protocols.train_spec import get_train_spec

    from tst_titan.specs import register_specs

    register_specs()
    spec = get_train_spec(spec_name)
    args = spec.model_args[flavor]
    with torch.device("meta"):
        model = spec.model_cls(args)
    return float(args.get_nparams_and_flops(model, seq_len)[1])


def measure(kind: str, path: str | None, workers: int, tokenizer, args) -> float:
    """Data tokens/s of phase-1 batches delivered to the training loop."""
    from tst_titan.config import Data
    from tst_titan.data.loader import TSTDataLoader, TSTPackedDataset, build_stream
    from tst_titan.schedule import TSTPlan

    plan = TSTPlan(bag_size=args.bag, switch_step=10**9, total_steps=10**9, seq_len=args.seq_len)
    src, tok = build_stream(kind, path, "train", 0, 1, tokenizer, Data(embedded_vocab_size=args.vocab),
                            loop=True)
    ds = TSTPackedDataset(src, tok, plan, samples_per_step=args.batch, batch_size=args.batch)
    extra = {"prefetch_factor": 4, "persistent_workers": True} if workers else {}
    loader = TSTDataLoader(ds, dp_rank=0, dp_world_size=1, batch_size=args.batch, num_workers=workers, **extra)
    it = iter(loader)
    next(it)  # worker start-up and the first batch are not timed
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        x, _ = next(it)
        n += x["input"].numel()
    rate = n / (time.perf_counter() - t0)
    del it, loader
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=32768, help="embedded BPE vocabulary (>= 32k: a real-size tokenizer)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--bag", type=int, default=6)
    p.add_argument("--batch", type=int, default=16, help="samples per batch (the 270M config's microbatch)")
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per row")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--mfu", type=float, default=0.40)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100/H200 bf16 dense peak")
    p.add_argument("--store", default=None, help="an existing store of the embedded corpus (else made in a temp dir)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    from tst_titan.config import Data
    from tst_titan.data.prepare import prepare_store, source_texts
    from tst_titan.data.tokenizer import resolve_tokenizer_path

    t0 = time.perf_counter()
    tok_dir = resolve_tokenizer_path("embedded", args.vocab)
    tokenizer = HuggingFaceTokenizer(tok_dir)
    print(f"tokenizer: embedded byte-level BPE, {tokenizer.get_vocab_size():,} tokens ({tok_dir}), "
          f"ready in {time.perf_counter() - t0:.1f} s")
    tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
    store = args.store or str(Path(tmp.name) / "store")
    t0 = time.perf_counter()
    m = prepare_store(source_texts("embedded", None, "train", Data()), tokenizer, tok_dir, store,
                      log=lambda _m: None)
    prep_s = time.perf_counter() - t0
    print(f"store: {m.num_documents:,} documents, {m.num_tokens:,} tokens ({m.dtype}); "
          f"prepared in {prep_s:.1f} s = {m.num_tokens / prep_s / 1e6:.2f}M tokens/s on {os.cpu_count()} cores")

    window = args.bag * (args.seq_len + 1)
    print(f"\nphase-1 batches: {args.batch} samples x {window:,} stream tokens "
          f"(s = {args.bag}, L = {args.seq_len}), {args.seconds:.0f} s per row\n")
    need = []
    for spec, flavor, s in SHAPES:
        f = flops_per_position(spec, flavor, args.seq_len)
        pos = args.mfu * args.peak_tflops * 1e12 / f
        need.append((flavor, s, f, pos, s * pos))
    need_270m = need[0][4]

    rows = []
    for kind, path in (("embedded", None), ("store", store)):
        for w in args.workers:
            rate = measure(kind, path, w, tokenizer, args)
            rows.append((kind, w, rate))
            label = "on the fly" if kind == "embedded" else "token store"
            per_proc = rate / max(1, w)
            print(f"{label:<12} workers={w}: {rate / 1e6:8.2f}M data tokens/s "
                  f"({per_proc / 1e6:7.2f}M per loader process) = {rate / need_270m:6.2f}x the 270M "
                  f"phase-1 need, {per_proc / need_270m:6.2f}x per loader process", flush=True)

    print(f"\nwhat one GPU consumes in phase 1 (torchtitan FLOPs per position at seq_len "
          f"{args.seq_len}, MFU {args.mfu:.0%}, peak {args.peak_tflops:.0f} TFLOP/s):")
    best = {k: max(r for kk, w, r in rows if kk == k) for k in ("embedded", "store")}
    for flavor, s, f, pos, tok_s in need:
        print(f"  {flavor:<8} s={s:<2} {f / 1e9:6.2f} GFLOP/position  {pos / 1e3:7.1f}k positions/s  "
              f"need {tok_s / 1e6:5.2f}M data tokens/s | on the fly {best['embedded'] / tok_s:5.2f}x, "
              f"store {best['store'] / tok_s:6.2f}x")
    one = {k: next(r for kk, w, r in rows if kk == k and w == 0) for k in ("embedded", "store")}
    print(f"\nstore / on the fly (one process, no workers): {one['store'] / one['embedded']:.1f}x")
    print(f"store, one loader process / 270M phase-1 need: {one['store'] / need_270m:.1f}x (target >= 10x)")
    print(f"on the fly, one loader process / 270M phase-1 need: {one['embedded'] / need_270m:.2f}x")


if __name__ == "__main__":
    main()
