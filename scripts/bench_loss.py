"""Output projection + loss, forward and backward: stock cross-entropy vs the multi-hot
loss vs the fused (chunked) head, eager and compiled.

Every variant computes ``h [N, D] @ W.T [D, V]`` and a loss, then backward to ``h`` and
``W`` (the model's last hidden states and output weight), in ``--dtype`` (bf16 by
default, the compute dtype under FSDP mixed precision):

    ce_*           logits, then torchtitan's cross_entropy_loss on one label per position
    s_ces_eager    logits, then s stock cross-entropies (one per bag slot) / s
    mce_*          logits, then tst_titan's multi-hot loss on s labels per position
    fused_*        tst.fused_loss: projection + multi-hot loss over row chunks
    fused_ce_*     tst.fused_loss on one label per position (next-token phase)

Each variant runs in a fresh process: a warm-up step (compiles), then ``--reps`` timed
steps. Peak memory is that of the first timed step above what was live before it:
CUDA ``max_memory_allocated``; on CPU the process's resident high-water mark (reset
through /proc/self/clear_refs, with glibc made to return every block >= 64 KiB to
the OS, so freed tensors leave the resident set). Errors are against a float64
reference written here (chunked, computed once per run): relative error of the loss,
and max |grad - ref| / max |ref| for the gradients of h and W.

    python scripts/bench_loss.py                                   # small, every variant
    python scripts/bench_loss.py --vocab 128256 --positions 8192 --bag 6 --json rows.json
    python scripts/bench_loss.py --no-grad --variants ce_eager,fused_eager   # validation
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

VARIANTS = (
    "ce_eager", "ce_compiled", "s_ces_eager", "mce_eager", "mce_compiled",
    "fused_eager", "fused_compiled", "fused_ce_eager", "fused_ce_compiled",
)
IGNORE = -100


def _inputs(args, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = getattr(torch, args.dtype)
    h = torch.randn(args.positions, args.dim, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(args.vocab, args.dim, generator=g) / args.dim**0.5).to(device=device, dtype=dtype)
    labels = torch.randint(0, args.vocab, (args.positions, args.bag), generator=g).to(device)
    return h.requires_grad_(True), w.requires_grad_(True), labels


def _make_step(variant: str, args):
    """A closure running one forward + backward of ``variant`` on (h, w, labels)."""
    from tst_titan.fused_loss import chunk_step, fused_linear_multi_hot_ce
    from tst_titan.loss import TSTLoss

    compiled = variant.endswith("_compiled")
    kind = variant.rsplit("_", 1)[0]
    weights = torch.full((args.bag,), 1.0 / args.bag)
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
        from torchtitan.components.loss import cross_entropy_loss

        def step(h, w, labels):
            logits = (h @ w.t()).unsqueeze(0)
            s = labels.shape[1]
            loss = sum(cross_entropy_loss(logits, labels[None, :, j]) / s for j in range(s))
            del logits
            _backward(loss)
            return loss

    else:  # fused, fused_ce
        step_fn = torch.compile(chunk_step) if compiled else chunk_step
        wts = weights.to(args.device) if kind == "fused" else None

        def step(h, w, labels):
            lab = labels if kind == "fused" else labels[:, 0]
            out = fused_linear_multi_hot_ce(h, w, lab, wts, chunk_size=args.chunk, step_fn=step_fn)
            _backward(out.loss_sum)
            return out.loss_sum

    return step


# -- float64 reference --------------------------------------------------------------
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


def _reference_file(args, path: str) -> None:
    device = torch.device(args.device)
    h, w, labels = _inputs(args, device)
    out = {}
    for key, s_used in (("bag", args.bag), ("one", 1)):
        loss, dh, dw = reference(h, w, labels, s_used)
        out[key] = (loss.cpu(), dh.cpu(), dw.cpu())
    torch.save(out, path)


def _backward(loss: torch.Tensor) -> None:
    if loss.requires_grad:  # not under --no-grad
        loss.backward()


def _errors(loss, h, w, ref) -> dict:
    rl, rdh, rdw = ref
    rel = lambda a, r: float((a.double().cpu() - r).abs().max() / r.abs().max().clamp_min(1e-300))  # noqa: E731
    return {
        "loss": float(loss),
        "max_rel_err_loss": float(abs(float(loss) - float(rl)) / abs(float(rl))),
        "max_rel_err_grad_h": rel(h.grad, rdh) if h.grad is not None else float("nan"),
        "max_rel_err_grad_w": rel(w.grad, rdw) if w.grad is not None else float("nan"),
    }


# -- one variant, in a fresh process ------------------------------------------------------
def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_variant(variant: str, args) -> dict:
    device = torch.device(args.device)
    h, w, labels = _inputs(args, device)
    step = _make_step(variant, args)
    with torch.set_grad_enabled(not args.no_grad):
        step(h, w, labels)  # warm-up (and compile)
    h.grad = w.grad = None
    times, peak = [], 0
    for rep in range(args.reps):
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
        with torch.set_grad_enabled(not args.no_grad):
            loss = step(h, w, labels)
        _sync(device)
        times.append(time.perf_counter() - t0)
        if rep == 0:
            peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _proc_status("VmHWM")) - base
    row = {
        "variant": variant, "device": args.device, "positions": args.positions, "vocab": args.vocab,
        "dim": args.dim, "bag": args.bag, "dtype": args.dtype, "chunk": args.chunk, "no_grad": args.no_grad,
        "time_ms": statistics.median(times) * 1e3, "peak_mem_bytes": int(peak), "reps": args.reps,
        "mem_method": "cuda max_memory_allocated" if device.type == "cuda" else "process RSS high-water mark",
        "torch": torch.__version__,
    }
    if args.ref:
        ref = torch.load(args.ref)["one" if variant.startswith(("ce_", "fused_ce_")) else "bag"]
        row.update(_errors(loss, h, w, ref))
    return row


def _estimate_cpu_bytes(variant: str, args) -> int:
    """Peak bytes per logit measured on CPU (bf16 h and W), to stay in the memory budget."""
    nv = args.positions * args.vocab
    if variant == "s_ces_eager":
        return nv * (2 + 4 * (args.bag + 1))
    if variant == "ce_eager":
        return nv * 12
    return nv * 6


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        return int(re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positions", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--dim", type=int, default=768, help="hidden size (768: the 270M shape)")
    p.add_argument("--bag", type=int, default=6)
    p.add_argument("--chunk", type=int, default=1024, help="rows per chunk of the fused head")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--max-cpu-gb", type=float, default=12.0,
                   help="on CPU, skip variants whose estimated peak exceeds this")
    p.add_argument("--json", help="write the rows (a JSON list) here")
    p.add_argument("--no-grad", action="store_true",
                   help="forward only under torch.no_grad (validation): the loss, no backward")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print its row
    p.add_argument("--ref", help=argparse.SUPPRESS)  # internal: reference file
    p.add_argument("--make-ref", help=argparse.SUPPRESS)  # internal: write the reference file
    args = p.parse_args()
    if args.make_ref:
        _reference_file(args, args.make_ref)
        return
    if args.one:
        print("ROW " + json.dumps(run_variant(args.one, args)))
        return

    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    base_cmd = [sys.executable, os.path.abspath(__file__), "--positions", str(args.positions),
                "--vocab", str(args.vocab), "--dim", str(args.dim), "--bag", str(args.bag),
                "--chunk", str(args.chunk), "--dtype", args.dtype, "--reps", str(args.reps),
                "--device", args.device] + (["--no-grad"] if args.no_grad else [])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ref = os.path.join(tmp, "ref.pt")
        t0 = time.perf_counter()
        subprocess.run(base_cmd + ["--make-ref", ref], check=True, env=env)
        print(f"float64 reference: {time.perf_counter() - t0:.1f} s", flush=True)
        for v in variants:
            need = _estimate_cpu_bytes(v, args)
            if args.device == "cpu" and (need > args.max_cpu_gb * 2**30 or need > _mem_available() - 2**31):
                print(f"{v}: skipped (estimated {need / 2**30:.1f} GiB; --max-cpu-gb {args.max_cpu_gb}, "
                      f"{_mem_available() / 2**30:.1f} GiB available)", flush=True)
                continue
            out = subprocess.run(base_cmd + ["--one", v, "--ref", ref], capture_output=True, text=True, env=env)
            if out.returncode != 0:
                sys.exit(f"{v} failed:\n{out.stderr[-3000:]}")
            rows[v] = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("ROW "))[4:])
            r = rows[v]
            print(f"  {v}: {r['time_ms']:.1f} ms, {r['peak_mem_bytes'] / 2**20:.1f} MiB", flush=True)

    print(f"device={args.device} positions={args.positions} vocab={args.vocab} dim={args.dim} "
          f"s={args.bag} {args.dtype} h and W, head + loss {'forward (no_grad)' if args.no_grad else 'fwd+bwd'}, "
          f"median of {args.reps}, "
          f"fused chunk {args.chunk}")
    print(f"{'variant':<20}{'time (ms)':>12}{'peak (MiB)':>14}{'rel err loss':>14}"
          f"{'rel err dh':>12}{'rel err dW':>12}")
    for v, r in rows.items():
        print(f"{v:<20}{r['time_ms']:>12.1f}{r['peak_mem_bytes'] / 2**20:>14.1f}"
              f"{r['max_rel_err_loss']:>14.2e}{r['max_rel_err_grad_h']:>12.2e}{r['max_rel_err_grad_w']:>12.2e}")

    def ratio(label: str, a: str, b: str, target: str = "") -> None:
        if a in rows and b in rows:
            ta, ma = rows[a]["time_ms"], rows[a]["peak_mem_bytes"]
            tb, mb = rows[b]["time_ms"], rows[b]["peak_mem_bytes"]
            print(f"{label:<34}time {ta / tb:.2f}x, memory {ma / max(mb, 1):.2f}x" + (f"   ({target})" if target else ""))

    ratio("multi_hot / one CE:", "mce_eager", "ce_eager", "target <= 1.2x")
    ratio("multi_hot / s CEs:", "mce_eager", "s_ces_eager")
    ratio("compiled multi_hot / compiled CE:", "mce_compiled", "ce_compiled", "target memory <= 1.05x")
    ratio("fused / one CE, eager:", "fused_eager", "ce_eager", "target memory <= 0.5x, time <= 1.3x")
    ratio("fused / one CE, compiled:", "fused_compiled", "ce_compiled", "target memory <= 0.5x, time <= 1.3x")
    ratio("fused next-token / CE, eager:", "fused_ce_eager", "ce_eager")
    ratio("fused next-token / CE, compiled:", "fused_ce_compiled", "ce_compiled")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(list(rows.values()), f, indent=1)


if __name__ == "__main__":
    main()
