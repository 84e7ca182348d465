"""Phase-1 TST steps against plain steps of the same model and sequence length.

In one process, alternating, it times full training steps (forward, backward, AdamW)
of a plain next-token batch ``[B, L]`` and of a superposition batch ``[B, L, s]``:
data tokens/s TST / plain (the limit is s), positions/s TST / plain (the limit is 1.0),
peak memory TST / plain (CUDA only), and the share of step time spent in the bag
embedding and in the multi-hot loss. Used by ``scripts/bench_throughput.py``.

Precision follows single-device torchtitan training (``"bf16"``, the default on CUDA):
fp32 parameters and optimizer state, bf16 compute under torchtitan's own
``maybe_enable_amp`` autocast. The model is never cast with ``.to(bfloat16)``: that
would also cast llama3's complex RoPE buffer ``freqs_cis`` and drop its imaginary part
(a warning only), timing a broken model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torchtitan.components.loss import cross_entropy_loss
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.distributed.utils import maybe_enable_amp

from tst_titan.loss import multi_hot_cross_entropy
from tst_titan.model import TSTLlama3
from tst_titan.specs import tst_llama3_flavors

PRECISIONS = ("bf16", "fp32")


def default_precision(device: torch.device) -> str:
    """bf16 on CUDA (what training uses there), fp32 elsewhere."""
    return "bf16" if device.type == "cuda" else "fp32"


def build_model(flavor: str, seq_len: int, device: torch.device, precision: str):
    """The benchmarked model and the autocast context of its forward passes.

    ``precision="bf16"``: fp32 parameters, bf16 compute through torchtitan's
    ``maybe_enable_amp`` (what a single-device torchtitan run uses); buffers, including
    the complex ``freqs_cis``, are left as built. ``"fp32"``: no autocast.
    """
    model_args = dataclasses.replace(tst_llama3_flavors[flavor], max_seq_len=seq_len)
    torch.manual_seed(0)
    with torch.device(device):
        model = TSTLlama3(model_args)
        with torch.no_grad():
            model.init_weights()
    if precision == "fp32":
        return model, contextlib.nullcontext
    if precision != "bf16":
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    single = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    return model, lambda: maybe_enable_amp(single, "bfloat16", device.type)


@dataclass
class ThroughputResult:
    device: str
    flavor: str
    batch: int
    seq_len: int
    bag: int
    precision: str
    steps: int
    plain_step_s: float  # median seconds of a plain next-token step
    tst_step_s: float  # median seconds of a phase-1 (bag) step
    bag_embedding_s: float  # bag embedding forward + backward
    multi_hot_loss_s: float  # multi-hot loss forward + backward on [B, L, V] logits
    peak_plain_bytes: int | None  # CUDA only
    peak_tst_bytes: int | None

    def lines(self) -> list[str]:
        """The report scripts/bench_throughput.py prints."""
        plain, tst = self.plain_step_s, self.tst_step_s
        memory = (f"{self.peak_tst_bytes / self.peak_plain_bytes:.3f}" if self.peak_plain_bytes
                  else "n/a on CPU")
        return [
            f"device={self.device} flavor={self.flavor} B={self.batch} L={self.seq_len} s={self.bag} "
            f"precision={self.precision} median of {self.steps} alternating steps",
            f"plain step {plain * 1e3:.1f} ms, TST phase-1 step {tst * 1e3:.1f} ms",
            f"data tokens/s  TST / plain: {self.bag * plain / tst:.2f}   (limit {self.bag})",
            f"positions/s    TST / plain: {plain / tst:.3f}  (limit 1.0)",
            "peak memory    TST / plain: " + memory,
            f"share of TST step: bag embedding {100 * self.bag_embedding_s / tst:.1f}%, "
            f"multi-hot loss {100 * self.multi_hot_loss_s / tst:.1f}%",
        ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_time(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_throughput(
    flavor: str, seq_len: int, batch: int, bag: int, steps: int, device: torch.device,
    precision: str | None = None,
) -> ThroughputResult:
    """Median times of ``steps`` plain and phase-1 steps, alternating so that drift hits
    both alike (after two warm-up steps of each), then the bag embedding and the
    multi-hot loss alone on the same shapes, then peak memory of one step of each."""
    precision = precision or default_precision(device)
    model, autocast = build_model(flavor, seq_len, device, precision)
    compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    vocab = model.model_args.vocab_size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def random_batch(bags: bool) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (batch, seq_len, bag) if bags else (batch, seq_len)
        return torch.randint(0, vocab, shape, device=device), torch.randint(0, vocab, shape, device=device)

    def step(bags: bool) -> float:
        inputs, labels = random_batch(bags)
        _sync(device)
        t0 = time.perf_counter()
        with autocast():
            pred = model(inputs)
            loss = multi_hot_cross_entropy(pred, labels) if bags else cross_entropy_loss(pred, labels)
        (loss / (batch * seq_len)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - t0

    def peak(bags: bool) -> int | None:
        if device.type != "cuda":
            return None
        torch.cuda.reset_peak_memory_stats()
        step(bags)
        return torch.cuda.max_memory_allocated()

    for bags in (False, True, False, True):  # warm-up both kinds
        step(bags)
    plain, tst = [], []
    for _ in range(steps):
        plain.append(step(False))
        tst.append(step(True))

    bag_inputs, bag_labels = random_batch(True)

    def bag_embedding() -> None:
        with autocast():
            model.tok_embeddings(bag_inputs).sum().backward()

    logits = torch.randn(batch, seq_len, vocab, device=device, dtype=compute_dtype, requires_grad=True)

    def multi_hot_loss() -> None:
        multi_hot_cross_entropy(logits, bag_labels).backward()

    embedding_s = _median_time(bag_embedding, steps, device)
    loss_s = _median_time(multi_hot_loss, steps, device)
    model.tok_embeddings.weight.grad = None
    peak_plain, peak_tst = peak(False), peak(True)
    return ThroughputResult(
        str(device), flavor, batch, seq_len, bag, precision, steps,
        statistics.median(plain), statistics.median(tst), embedding_s, loss_s, peak_plain, peak_tst,
    )
