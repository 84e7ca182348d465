"""Data feed: data tokens/s the loader delivers vs what a phase-1 step consumes on a GPU.
Used by ``scripts/bench_data.py``.

A TST phase-1 step reads ``s`` times the data tokens of a plain step, so the loader,
not the model, can decide the speed. This measures phase-1 batches (the paper-shape
window: ``s*(L+1)`` tokens per sample) from two paths, with each given number of
dataloader workers:

- on the fly: the embedded corpus tokenized in the loop (what ``dataset = "embedded"``,
  ``"local"`` and ``"hf"`` do);
- token store: the same documents prepared once (as by scripts/prepare_data.py) and
  read from memory maps (``dataset = "store"``).

The tokenizer is the embedded byte-level BPE trained with ``vocab`` tokens (a stand-in
for the Llama-3 tokenizer: same library, a smaller vocabulary). What a GPU consumes
comes from torchtitan's own FLOPs per position for each paper shape at the stated MFU
and peak: ``need = s * MFU * peak / flops_per_position`` data tokens/s.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.protocols.train_spec import get_train_spec

from tst_titan.config import Data
from tst_titan.data.loader import TSTDataLoader, TSTPackedDataset, build_stream
from tst_titan.data.prepare import prepare_store, source_texts
from tst_titan.data.tokenizer import resolve_tokenizer_path
from tst_titan.schedule import TSTPlan
from tst_titan.specs import register_specs

# (train spec, flavor, s): the paper's shapes and their bag sizes
SHAPES = [("tst_llama3", "270M", 6), ("tst_llama3", "600M", 6), ("tst_llama3", "3B", 6),
          ("tst_qwen3", "10B-A1B", 16)]
LABELS = {"embedded": "on the fly", "store": "token store"}


@dataclass
class FeedConfig:
    vocab: int = 32768  # embedded BPE vocabulary (>= 32k: a real-size tokenizer)
    seq_len: int = 4096
    bag: int = 6
    batch: int = 16  # samples per batch (the 270M config's microbatch)
    seconds: float = 10.0  # timed seconds per row
    workers: list[int] = field(default_factory=lambda: [0, 1, 2])
    mfu: float = 0.40
    peak_tflops: float = 989.0  # H100/H200 bf16 dense peak


@dataclass
class GpuNeed:
    """What one GPU consumes in phase 1 for one paper shape."""

    flavor: str
    bag: int
    flops_per_position: float
    positions_per_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.bag * self.positions_per_s


@dataclass
class FeedRow:
    kind: str  # "embedded" (on the fly) or "store"
    workers: int
    tokens_per_s: float


def flops_per_position(spec_name: str, flavor: str, seq_len: int) -> float:
    """torchtitan's training FLOPs per position of a registered flavor (built on meta)."""
    register_specs()
    spec = get_train_spec(spec_name)
    args = spec.model_args[flavor]
    with torch.device("meta"):
        model = spec.model_cls(args)
    return float(args.get_nparams_and_flops(model, seq_len)[1])


def gpu_needs(cfg: FeedConfig) -> list[GpuNeed]:
    """Phase-1 consumption of each of :data:`SHAPES` at ``cfg``'s MFU and peak."""
    out = []
    for spec, flavor, bag in SHAPES:
        flops = flops_per_position(spec, flavor, cfg.seq_len)
        out.append(GpuNeed(flavor, bag, flops, cfg.mfu * cfg.peak_tflops * 1e12 / flops))
    return out


def feed_rate(kind: str, path: str | None, workers: int, tokenizer, cfg: FeedConfig) -> float:
    """Data tokens/s of phase-1 batches delivered to the training loop."""
    plan = TSTPlan(bag_size=cfg.bag, switch_step=10**9, total_steps=10**9, seq_len=cfg.seq_len)
    src, tok = build_stream(kind, path, "train", 0, 1, tokenizer, Data(embedded_vocab_size=cfg.vocab), loop=True)
    ds = TSTPackedDataset(src, tok, plan, samples_per_step=cfg.batch, batch_size=cfg.batch)
    extra = {"prefetch_factor": 4, "persistent_workers": True} if workers else {}
    loader = TSTDataLoader(ds, dp_rank=0, dp_world_size=1, batch_size=cfg.batch, num_workers=workers, **extra)
    it = iter(loader)
    next(it)  # worker start-up and the first batch are not timed
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < cfg.seconds:
        x, _ = next(it)
        n += x["input"].numel()
    rate = n / (time.perf_counter() - t0)
    del it, loader
    return rate


@dataclass
class FeedReport:
    cfg: FeedConfig
    rows: list[FeedRow]
    needs: list[GpuNeed]

    def rates(self, kind: str) -> dict[int, float]:
        """Data tokens/s of ``kind`` by number of workers."""
        return {r.workers: r.tokens_per_s for r in self.rows if r.kind == kind}

    def summary_lines(self) -> list[str]:
        """What one GPU consumes per shape against the best measured feed, then the
        one-process ratios (the store's target: >= 10x the 270M need) when a row without
        workers was measured."""
        cfg, need_270m = self.cfg, self.needs[0].tokens_per_s
        lines = [f"\nwhat one GPU consumes in phase 1 (torchtitan FLOPs per position at seq_len "
                 f"{cfg.seq_len}, MFU {cfg.mfu:.0%}, peak {cfg.peak_tflops:.0f} TFLOP/s):"]
        best = {kind: max(self.rates(kind).values()) for kind in LABELS}
        for need in self.needs:
            tok_s = need.tokens_per_s
            lines.append(
                f"  {need.flavor:<8} s={need.bag:<2} {need.flops_per_position / 1e9:6.2f} GFLOP/position  "
                f"{need.positions_per_s / 1e3:7.1f}k positions/s  need {tok_s / 1e6:5.2f}M data tokens/s | "
                f"on the fly {best['embedded'] / tok_s:5.2f}x, store {best['store'] / tok_s:6.2f}x")
        if 0 not in cfg.workers:
            return lines
        one = {kind: self.rates(kind)[0] for kind in LABELS}
        lines += [
            f"\nstore / on the fly (one process, no workers): {one['store'] / one['embedded']:.1f}x",
            f"store, one loader process / 270M phase-1 need: {one['store'] / need_270m:.1f}x (target >= 10x)",
            f"on the fly, one loader process / 270M phase-1 need: {one['embedded'] / need_270m:.2f}x",
        ]
        return lines


def run_feed_bench(cfg: FeedConfig, store: str | None = None, log: Callable[[str], None] = print) -> FeedReport:
    """Tokenizer, store (prepared in a temporary folder unless ``store`` names one), then
    one timed row per path and worker count, each logged as it finishes."""
    t0 = time.perf_counter()
    tok_dir = resolve_tokenizer_path("embedded", cfg.vocab)
    tokenizer = HuggingFaceTokenizer(tok_dir)
    log(f"tokenizer: embedded byte-level BPE, {tokenizer.get_vocab_size():,} tokens ({tok_dir}), "
        f"ready in {time.perf_counter() - t0:.1f} s")
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        store = store or str(Path(tmp) / "store")
        t0 = time.perf_counter()
        m = prepare_store(source_texts("embedded", None, "train", Data()), tokenizer, tok_dir, store,
                          log=lambda _line: None)
        prep_s = time.perf_counter() - t0
        log(f"store: {m.num_documents:,} documents, {m.num_tokens:,} tokens ({m.dtype}); "
            f"prepared in {prep_s:.1f} s = {m.num_tokens / prep_s / 1e6:.2f}M tokens/s on {os.cpu_count()} cores")

        window = cfg.bag * (cfg.seq_len + 1)
        log(f"\nphase-1 batches: {cfg.batch} samples x {window:,} stream tokens "
            f"(s = {cfg.bag}, L = {cfg.seq_len}), {cfg.seconds:.0f} s per row\n")
        needs = gpu_needs(cfg)
        need_270m = needs[0].tokens_per_s
        rows = []
        for kind, path in (("embedded", None), ("store", store)):
            for workers in cfg.workers:
                rate = feed_rate(kind, path, workers, tokenizer, cfg)
                rows.append(FeedRow(kind, workers, rate))
                per_proc = rate / max(1, workers)
                log(f"{LABELS[kind]:<12} workers={workers}: {rate / 1e6:8.2f}M data tokens/s "
                    f"({per_proc / 1e6:7.2f}M per loader process) = {rate / need_270m:6.2f}x the 270M "
                    f"phase-1 need, {per_proc / need_270m:6.2f}x per loader process")
    return FeedReport(cfg, rows, needs)
