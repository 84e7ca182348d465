"""Output projection + loss, forward and backward: stock cross-entropy vs the multi-hot
loss vs the fused (chunked) head, eager and compiled. Used by ``scripts/bench_loss.py``
(and through it by the GPU check's ``loss`` row).

Every variant computes ``h [N, D] @ W.T [D, V]`` and a loss, then backward to ``h`` and
``W`` (the model's last hidden states and output weight), in the configured dtype:

    ce_*           logits, then torchtitan's cross_entropy_loss on one label per position
    s_ces_eager    logits, then s stock cross-entropies (one per bag slot) / s
    mce_*          logits, then tst_titan's multi-hot loss on s labels per position
    fused_*        tst.fused_loss: projection + multi-hot loss over row chunks
    fused_ce_*     tst.fused_loss on one label per position (next-token phase)

Each variant runs in a fresh process (``python -m tst_titan.bench.loss``, so one
variant's allocations and compiled graphs do not colour the next): a warm-up step
(compiles), then ``reps`` timed steps. Peak memory is that of the first timed step above
what was live before it: CUDA ``max_memory_allocated``; on CPU the process's resident
high-water mark (reset through /proc/self/clear_refs, with glibc made to return every
block >= 64 KiB to the OS, so freed tensors leave the resident set). Errors are against
a float64 reference (chunked, computed once per run, in its own process): relative error
of the loss, and max |grad - ref| / max |ref| for the gradients of h and W.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torchtitan.components.loss import cross_entropy_loss

from tst_titan.errors import ConfigError
from tst_titan.fused_loss import chunk_step, fused_linear_multi_hot_ce
from tst_titan.loss import TSTLoss

VARIANTS = (
    "ce_eager", "ce_compiled", "s_ces_eager", "mce_eager", "mce_compiled",
    "fused_eager", "fused_compiled", "fused_ce_eager", "fused_ce_compiled",
)
WORKER_MODULE = "tst_titan.bench.loss"  # run as ``python -m`` for one variant or the reference
# glibc returns freed blocks of this size and more to the OS: the CPU peak (RSS) then
# measures what a variant holds, not what the allocator kept.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


@dataclass
class LossBenchConfig:
    positions: int = 2048
    vocab: int = 32768
    dim: int = 768  # hidden size (768: the 270M shape)
    bag: int = 6
    chunk: int = 1024  # rows per chunk of the fused head
    dtype: str = "bfloat16"
    reps: int = 3
    device: str = "cpu"
    no_grad: bool = False  # forward only under torch.no_grad (validation): no backward
    max_cpu_gb: float = 12.0  # on CPU, skip variants whose estimated peak exceeds this


class VariantFailed(RuntimeError):
    """A variant's process exited with an error (its stderr's tail is the message)."""


def parse_variants(text: str) -> list[str]:
    """The comma-separated variant names, each checked against :data:`VARIANTS`."""
    variants = [v for v in text.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ConfigError(f"--variants: unknown variants {unknown}; choose from {list(VARIANTS)}")
    return variants


def make_inputs(cfg: LossBenchConfig, device: torch.device):
    """h [N, D], W [V, D] (both requiring grad) and s labels per position, seeded."""
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = getattr(torch, cfg.dtype)
    h = torch.randn(cfg.positions, cfg.dim, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(cfg.vocab, cfg.dim, generator=g) / cfg.dim**0.5).to(device=device, dtype=dtype)
    labels = torch.randint(0, cfg.vocab, (cfg.positions, cfg.bag), generator=g).to(device)
    return h.requires_grad_(True), w.requires_grad_(True), labels


def _backward(loss: torch.Tensor) -> None:
    if loss.requires_grad:  # not under no_grad
        loss.backward()


def make_step(variant: str, cfg: LossBenchConfig) -> Callable:
    """A closure running one forward + backward of ``variant`` on (h, w, labels)."""
    compiled = variant.endswith("_compiled")
    kind = variant.rsplit("_", 1)[0]
    weights = torch.full((cfg.bag,), 1.0 / cfg.bag)
    if kind in ("ce", "mce"):
        compile_fn = (lambda fn: torch.compile(fn)) if compiled else None  # as build_tst_loss
        loss_fn = TSTLoss(weights, compile_fn=compile_fn)

        def step(h, w, labels):
            lab = labels[:, :1].squeeze(-1) if kind == "ce" else labels
            logits = h @ w.t()
            loss = loss_fn(logits.unsqueeze(0), lab.unsqueeze(0))
            del logits  # like torchtitan's forward_backward_step: free pred before backward
            _backward(loss)
            return loss

    elif kind == "s_ces":

        def step(h, w, labels):
            logits = (h @ w.t()).unsqueeze(0)
            bag = labels.shape[1]
            loss = sum(cross_entropy_loss(logits, labels[None, :, j]) / bag for j in range(bag))
            del logits
            _backward(loss)
            return loss

    else:  # fused, fused_ce
        step_fn = torch.compile(chunk_step) if compiled else chunk_step
        slot_weights = weights.to(cfg.device) if kind == "fused" else None

        def step(h, w, labels):
            lab = labels if kind == "fused" else labels[:, 0]
            out = fused_linear_multi_hot_ce(h, w, lab, slot_weights, chunk_size=cfg.chunk, step_fn=step_fn)
            _backward(out.loss_sum)
            return out.loss_sum

    return step


def reference(h, w, labels, s_used: int, rows: int = 256):
    """float64 loss sum and gradients of sum_n sum_j (1/s) CE(h_n W^T, t_nj), j < s_used."""
    hd, wd = h.detach().double(), w.detach().double()
    t = labels[:, :s_used]
    loss = torch.zeros((), dtype=torch.float64, device=h.device)
    dh = torch.empty_like(hd)
    dw = torch.zeros_like(wd)
    for a in range(0, hd.shape[0], rows):
        z = hd[a : a + rows] @ wd.t()
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        tc = t[a : a + rows]
        loss += (lse - z.gather(1, tc)).sum() / s_used
        g = torch.exp(z - lse)
        g.scatter_add_(1, tc, torch.full(tc.shape, -1.0 / s_used, dtype=torch.float64, device=h.device))
        dh[a : a + rows] = g @ wd
        dw += g.t() @ hd[a : a + rows]
    return loss, dh, dw


def write_reference(cfg: LossBenchConfig, path: str) -> None:
    """The references for s labels ("bag") and for one ("one"), saved for the variants."""
    h, w, labels = make_inputs(cfg, torch.device(cfg.device))
    out = {}
    for key, s_used in (("bag", cfg.bag), ("one", 1)):
        loss, dh, dw = reference(h, w, labels, s_used)
        out[key] = (loss.cpu(), dh.cpu(), dw.cpu())
    torch.save(out, path)


def relative_errors(loss, h, w, ref) -> dict:
    ref_loss, ref_dh, ref_dw = ref
    loss = float(loss.detach())

    def rel(a: torch.Tensor, r: torch.Tensor) -> float:
        return float((a.double().cpu() - r).abs().max() / r.abs().max().clamp_min(1e-300))

    return {
        "loss": loss,
        "max_rel_err_loss": abs(loss - float(ref_loss)) / abs(float(ref_loss)),
        "max_rel_err_grad_h": rel(h.grad, ref_dh) if h.grad is not None else float("nan"),
        "max_rel_err_grad_w": rel(w.grad, ref_dw) if w.grad is not None else float("nan"),
    }


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_variant(variant: str, cfg: LossBenchConfig, ref_path: str | None = None) -> dict:
    """Time and peak memory of ``variant`` (this process), its errors if ``ref_path``."""
    device = torch.device(cfg.device)
    h, w, labels = make_inputs(cfg, device)
    step = make_step(variant, cfg)
    with torch.set_grad_enabled(not cfg.no_grad):
        step(h, w, labels)  # warm-up (and compile)
    h.grad = w.grad = None
    times, peak = [], 0
    for rep in range(cfg.reps):
        h.grad = w.grad = None
        _sync(device)
        if rep == 0:
            if device.type == "cuda":
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            else:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the resident high-water mark
                base = _proc_status("VmRSS")
        t0 = time.perf_counter()
        with torch.set_grad_enabled(not cfg.no_grad):
            loss = step(h, w, labels)
        _sync(device)
        times.append(time.perf_counter() - t0)
        if rep == 0:
            peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _proc_status("VmHWM")) - base
    row = {
        "variant": variant, "device": cfg.device, "positions": cfg.positions, "vocab": cfg.vocab,
        "dim": cfg.dim, "bag": cfg.bag, "dtype": cfg.dtype, "chunk": cfg.chunk, "no_grad": cfg.no_grad,
        "time_ms": statistics.median(times) * 1e3, "peak_mem_bytes": int(peak), "reps": cfg.reps,
        "mem_method": "cuda max_memory_allocated" if device.type == "cuda" else "process RSS high-water mark",
        "torch": torch.__version__,
    }
    if ref_path:
        ref = torch.load(ref_path)["one" if variant.startswith(("ce_", "fused_ce_")) else "bag"]
        row.update(relative_errors(loss, h, w, ref))
    return row


def estimate_cpu_bytes(variant: str, cfg: LossBenchConfig) -> int:
    """Peak bytes per logit measured on CPU (bf16 h and W), to stay in the memory budget."""
    logits = cfg.positions * cfg.vocab
    if variant == "s_ces_eager":
        return logits * (2 + 4 * (cfg.bag + 1))
    if variant == "ce_eager":
        return logits * 12
    return logits * 6


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return int(re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def _worker(cfg: LossBenchConfig, *task: str) -> list[str]:
    return [sys.executable, "-m", WORKER_MODULE, json.dumps(dataclasses.asdict(cfg)), *task]


def run_variants(cfg: LossBenchConfig, variants: list[str], log: Callable[[str], None] = print) -> dict[str, dict]:
    """Each variant's row (see :func:`run_variant`), each in a fresh process, after the
    float64 reference; on CPU a variant whose estimated peak exceeds the budget or the
    available memory is skipped (and logged). Raises :class:`VariantFailed`."""
    env = {**os.environ, **WORKER_ENV}
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ref = os.path.join(tmp, "ref.pt")
        t0 = time.perf_counter()
        subprocess.run(_worker(cfg, "reference", ref), check=True, env=env)
        log(f"float64 reference: {time.perf_counter() - t0:.1f} s")
        for v in variants:
            need = estimate_cpu_bytes(v, cfg)
            if cfg.device == "cpu" and (need > cfg.max_cpu_gb * 2**30 or need > mem_available() - 2**31):
                log(f"{v}: skipped (estimated {need / 2**30:.1f} GiB; --max-cpu-gb {cfg.max_cpu_gb}, "
                    f"{mem_available() / 2**30:.1f} GiB available)")
                continue
            out = subprocess.run(_worker(cfg, "variant", v, ref), capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise VariantFailed(f"{v} failed:\n{out.stderr[-3000:]}")
            row_line = next(line for line in out.stdout.splitlines() if line.startswith("ROW "))
            rows[v] = row = json.loads(row_line[4:])
            log(f"  {v}: {row['time_ms']:.1f} ms, {row['peak_mem_bytes'] / 2**20:.1f} MiB")
    return rows


# (label, variant, baseline, target): the ratios the report prints when both rows exist
RATIOS = (
    ("multi_hot / one CE:", "mce_eager", "ce_eager", "target <= 1.2x"),
    ("multi_hot / s CEs:", "mce_eager", "s_ces_eager", ""),
    ("compiled multi_hot / compiled CE:", "mce_compiled", "ce_compiled", "target memory <= 1.05x"),
    ("fused / one CE, eager:", "fused_eager", "ce_eager", "target memory <= 0.5x, time <= 1.3x"),
    ("fused / one CE, compiled:", "fused_compiled", "ce_compiled", "target memory <= 0.5x, time <= 1.3x"),
    ("fused next-token / CE, eager:", "fused_ce_eager", "ce_eager", ""),
    ("fused next-token / CE, compiled:", "fused_ce_compiled", "ce_compiled", ""),
)


def report_lines(cfg: LossBenchConfig, rows: dict[str, dict]) -> list[str]:
    """The table of rows, then time and memory ratios against the stock loss."""
    lines = [
        f"device={cfg.device} positions={cfg.positions} vocab={cfg.vocab} dim={cfg.dim} "
        f"s={cfg.bag} {cfg.dtype} h and W, head + loss {'forward (no_grad)' if cfg.no_grad else 'fwd+bwd'}, "
        f"median of {cfg.reps}, fused chunk {cfg.chunk}",
        f"{'variant':<20}{'time (ms)':>12}{'peak (MiB)':>14}{'rel err loss':>14}{'rel err dh':>12}{'rel err dW':>12}",
    ]
    for v, r in rows.items():
        lines.append(f"{v:<20}{r['time_ms']:>12.1f}{r['peak_mem_bytes'] / 2**20:>14.1f}"
                     f"{r['max_rel_err_loss']:>14.2e}{r['max_rel_err_grad_h']:>12.2e}{r['max_rel_err_grad_w']:>12.2e}")
    for label, a, b, target in RATIOS:
        if a in rows and b in rows:
            time_x = rows[a]["time_ms"] / rows[b]["time_ms"]
            memory_x = rows[a]["peak_mem_bytes"] / max(rows[b]["peak_mem_bytes"], 1)
            lines.append(f"{label:<34}time {time_x:.2f}x, memory {memory_x:.2f}x" + (f"   ({target})" if target else ""))
    return lines


def _worker_main(argv: list[str]) -> None:
    """``python -m tst_titan.bench.loss CONFIG_JSON reference PATH`` writes the reference;
    ``... CONFIG_JSON variant NAME REF_PATH`` prints ``ROW <json>`` for one variant."""
    cfg = LossBenchConfig(**json.loads(argv[0]))
    if argv[1] == "reference":
        write_reference(cfg, argv[2])
    elif argv[1] == "variant":
        print("ROW " + json.dumps(run_variant(argv[2], cfg, argv[3])))
    else:
        raise SystemExit(f"{WORKER_MODULE}: unknown task {argv[1]!r}")


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
