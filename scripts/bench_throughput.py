"""Phase-1 TST steps against plain steps of the same model and sequence length.

In one process, alternating, it times full training steps (forward, backward, AdamW)
of a plain next-token batch [B, L] and of a superposition batch [B, L, s] and prints:
data tokens/s TST / plain (the limit is s), positions/s TST / plain (the limit is 1.0),
peak memory TST / plain (CUDA only), and the share of step time spent in the bag
embedding and in the multi-hot loss.

    python scripts/bench_throughput.py                       # debug flavor, CPU or GPU
    python scripts/bench_throughput.py --flavor 270M --seq-len 2048 --batch 8   # on a GPU

Precision follows single-device torchtitan training (``--precision bf16``, the default
on CUDA): fp32 parameters and optimizer state, bf16 compute under torchtitan's own
``maybe_enable_amp`` autocast. The model is never cast with ``.to(bfloat16)``: that
would also cast llama3's complex RoPE buffer ``freqs_cis`` and drop its imaginary part
(a warning only), timing a broken model.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F


def build_model(flavor: str, seq_len: int, device: torch.device, precision: str):
    """The benchmarked model and the autocast context of its forward passes.

    ``precision="bf16"``: fp32 parameters, bf16 compute through torchtitan's
    ``maybe_enable_amp`` (what a single-device torchtitan run uses); buffers, including
    the complex ``freqs_cis``, are left as built. ``"fp32"``: no autocast.
    """
    import tst_titan  # noqa: F401  (CPU shims, specs)
    from torchtitan.distributed.parallel_dims import ParallelDims
    from torchtitan.distributed.utils import maybe_enable_amp

    from tst_titan.model import TSTLlama3
    from tst_titan.specs import tst_llama3_flavors

    margs = dataclasses.replace(tst_llama3_flavors[flavor], max_seq_len=seq_len)
    torch.manual_seed(0)
    with torch.device(device):
        model = TSTLlama3(margs)
        with torch.no_grad():
            model.init_weights()
    if precision == "fp32":
        return model, contextlib.nullcontext
    if precision != "bf16":
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    single = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    return model, lambda: maybe_enable_amp(single, "bfloat16", device.type)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="debug")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--bag", type=int, default=6)
    p.add_argument("--steps", type=int, default=8, help="timed steps of each kind")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                   help="bf16: fp32 weights + bf16 autocast, as torchtitan on one device "
                        "(default on CUDA); fp32 (default on CPU)")
    args = p.parse_args()

    from torchtitan.components.loss import cross_entropy_loss
    from tst_titan.loss import multi_hot_cross_entropy

    dev = torch.device(args.device)
    precision = args.precision or ("bf16" if dev.type == "cuda" else "fp32")
    model, autocast = build_model(args.flavor, args.seq_len, dev, precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # compute dtype
    margs = model.model_args
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    B, L, s, V = args.batch, args.seq_len, args.bag, margs.vocab_size

    def batch(bags: bool):
        shape = (B, L, s) if bags else (B, L)
        return torch.randint(0, V, shape, device=dev), torch.randint(0, V, shape, device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step(bags: bool) -> float:
        x, y = batch(bags)
        sync()
        t0 = time.perf_counter()
        with autocast():
            pred = model(x)
            loss = multi_hot_cross_entropy(pred, y) if bags else cross_entropy_loss(pred, y)
        (loss / (B * L)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0

    def peak(bags: bool) -> int | None:
        if dev.type != "cuda":
            return None
        torch.cuda.reset_peak_memory_stats()
        step(bags)
        return torch.cuda.max_memory_allocated()

    for bags in (False, True, False, True):  # warm-up both kinds
        step(bags)
    plain, tst = [], []
    for _ in range(args.steps):  # alternate so drift hits both alike
        plain.append(step(False))
        tst.append(step(True))
    tp, tt = statistics.median(plain), statistics.median(tst)

    # component timings (forward + backward) on the same shapes
    def timed(fn, reps=args.steps) -> float:
        out = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    xb, yb = batch(True)
    emb_w = model.tok_embeddings.weight

    def bag_embed():
        with autocast():
            model.tok_embeddings(xb).sum().backward()

    logits = torch.randn(B, L, V, device=dev, dtype=dtype, requires_grad=True)

    def mce():
        multi_hot_cross_entropy(logits, yb).backward()

    t_emb, t_loss = timed(bag_embed), timed(mce)
    emb_w.grad = None
    mp, mt = peak(False), peak(True)

    print(f"device={dev} flavor={args.flavor} B={B} L={L} s={s} precision={precision} "
          f"median of {args.steps} alternating steps")
    print(f"plain step {tp * 1e3:.1f} ms, TST phase-1 step {tt * 1e3:.1f} ms")
    print(f"data tokens/s  TST / plain: {s * tp / tt:.2f}   (limit {s})")
    print(f"positions/s    TST / plain: {tp / tt:.3f}  (limit 1.0)")
    print("peak memory    TST / plain: " + (f"{mt / mp:.3f}" if mp else "n/a on CPU"))
    print(f"share of TST step: bag embedding {100 * t_emb / tt:.1f}%, multi-hot loss {100 * t_loss / tt:.1f}%")


if __name__ == "__main__":
    main()
