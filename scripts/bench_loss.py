"""Multi-hot cross-entropy vs s stock cross-entropies vs one cross-entropy (fwd + bwd).

Prints time and peak extra memory of each variant and the ratios the target is set
on (multi-hot within 1.2x of ONE cross-entropy). Each memory figure comes from a
fresh subprocess: CUDA ``max_memory_allocated`` on a GPU; on CPU the peak of live
tensor-storage bytes created by the step's ops (a dispatch-mode tracker).

    python scripts/bench_loss.py                 # N=2048 positions, V=32768, s=6
    python scripts/bench_loss.py --vocab 128256 --positions 4096 --bag 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

VARIANTS = ("multi_hot", "s_cross_entropies", "one_cross_entropy")


def _inputs(args, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(args.positions, args.vocab, generator=g, dtype=torch.bfloat16).to(device)
    labels = torch.randint(0, args.vocab, (args.positions, args.bag), generator=g).to(device)
    return logits, labels


def _step(variant: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
    from tst_titan.loss import multi_hot_cross_entropy

    x = logits.detach().requires_grad_(True)
    s = labels.shape[1]
    if variant == "multi_hot":
        loss = multi_hot_cross_entropy(x, labels)
    elif variant == "s_cross_entropies":
        loss = sum(F.cross_entropy(x.float(), labels[:, j], reduction="sum") / s for j in range(s))
    else:
        loss = F.cross_entropy(x.float(), labels[:, 0], reduction="sum")
    loss.backward()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_variant(variant, logits, labels, device, reps: int) -> float:
    _step(variant, logits, labels)  # warm-up
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        _step(variant, logits, labels)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _PeakTensorBytes:
    """CPU stand-in for CUDA's max_memory_allocated: live bytes of tensor storages created
    by ops (forward and backward), tracked through a dispatch mode with finalizers."""

    def __enter__(self):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self
        self.live = self.peak = 0
        self._seen: set[int] = set()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else [out]:
                    if isinstance(t, torch.Tensor):
                        st = t.untyped_storage()
                        key = st.data_ptr()
                        if key and key not in tracker._seen:
                            tracker._seen.add(key)
                            n = st.nbytes()
                            tracker.live += n
                            tracker.peak = max(tracker.peak, tracker.live)
                            weakref.finalize(st, tracker._free, key, n)
                return out

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def _free(self, key: int, n: int) -> None:
        self._seen.discard(key)
        self.live -= n

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


def memory_one(variant: str, args) -> int:
    """Peak extra bytes of one fwd+bwd, measured in this (fresh) process."""
    device = torch.device(args.device)
    logits, labels = _inputs(args, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(variant, logits, labels)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with _PeakTensorBytes() as m:
        _step(variant, logits, labels)
    return m.peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positions", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--bag", type=int, default=6)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--memory-only", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_only:
        print(json.dumps({"bytes": memory_one(args.memory_only, args)}))
        return

    device = torch.device(args.device)
    logits, labels = _inputs(args, device)
    res = {}
    for v in VARIANTS:
        t = time_variant(v, logits, labels, device, args.reps)
        out = subprocess.run(
            [sys.executable, __file__, "--memory-only", v, "--positions", str(args.positions),
             "--vocab", str(args.vocab), "--bag", str(args.bag), "--device", args.device],
            capture_output=True, text=True, check=True,
        )
        res[v] = (t, json.loads(out.stdout.strip().splitlines()[-1])["bytes"])
    print(f"device={args.device} positions={args.positions} vocab={args.vocab} s={args.bag} "
          f"bf16 logits, fwd+bwd, median of {args.reps}")
    print(f"{'variant':<20}{'time (ms)':>12}{'peak extra (MiB)':>20}")
    for v, (t, m) in res.items():
        print(f"{v:<20}{t * 1e3:>12.1f}{m / 2**20:>20.1f}")
    (tm, mm), (ts, ms), (t1, m1) = res["multi_hot"], res["s_cross_entropies"], res["one_cross_entropy"]
    print(f"multi_hot / one CE:  time {tm / t1:.2f}x, memory {mm / max(m1, 1):.2f}x   (target <= 1.2x)")
    print(f"multi_hot / s CEs:   time {tm / ts:.2f}x, memory {mm / max(ms, 1):.2f}x")


if __name__ == "__main__":
    main()
