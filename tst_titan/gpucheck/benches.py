"""The kernel-level rows: the loss benchmark (scripts/bench_loss.py) and the MoE layer."""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from torchtitan.models.moe import MoE

from tst_titan.analysis.fmt import format_number, median_or_none
from tst_titan.gpucheck.criteria import LossMeasured, LossSpec, MoeMeasured, MoeSpec, variant_ratio
from tst_titan.gpucheck.runs import (
    CONFIGS, LAUNCH_MODULE, SCRIPTS, RowContext, loss_rows, run_logged, torchrun,
)
from tst_titan.specs import tst_qwen3_flavors


def measure_loss(ctx: RowContext, spec: LossSpec) -> LossMeasured:
    """scripts/bench_loss.py's rows (projection + loss, fwd + bwd, bf16 h and W, each
    variant in a fresh process, errors against its float64 reference)."""
    out = ctx.work / "bench_loss.json"
    rc = run_logged([sys.executable, SCRIPTS / "bench_loss.py", "--device", spec.device, "--vocab", spec.vocab,
                     "--positions", spec.positions, "--bag", spec.bag_size, "--dim", spec.dim, "--json", out,
                     "--variants", ",".join(spec.variants)], ctx.work / "bench_loss.log")
    results = {r["variant"]: r for r in json.loads(out.read_text())} if rc == 0 and out.exists() else {}
    ratios = {}
    for limit in spec.ratio_limits:
        ratio = variant_ratio(results, limit.variant, limit.baseline)
        if ratio is not None:
            time_x, memory_x = ratio
            ratios[f"{limit.variant} / {limit.baseline}"] = {"time_x": round(time_x, 3), "memory_x": round(memory_x, 3)}
    table = {v: {"time_ms": round(r["time_ms"], 2), "peak_mib": round(r["peak_mem_bytes"] / 2**20, 1),
                 "rel_err_loss": format_number(r.get("max_rel_err_loss"))} for v, r in results.items()}
    figures = {"ratios": ratios, "variants": table} if results else {"log": "bench_loss.log"}
    return LossMeasured(exit_code=rc, results=results, figures=figures)


def moe_layer_errors(spec: MoeSpec) -> dict:
    """torchtitan's MoE layer at the flavor's shapes: grouped GEMM vs the for-loop experts
    (output and input gradient, relative to the for-loop's largest value), and their times."""
    args = tst_qwen3_flavors[spec.layer_flavor]
    torch.manual_seed(0)
    with torch.device("cuda"):
        moe = MoE(args.moe_args, dim=args.dim, hidden_dim=args.moe_inter_dim)
        moe.init_weights(0.02, buffer_device=torch.device("cuda"))
    moe = moe.to(torch.bfloat16)
    x = torch.randn(spec.layer_batch, spec.layer_seq_len, args.dim, device="cuda", dtype=torch.bfloat16)
    out, times = {}, {}
    for grouped in (True, False):
        moe.experts.use_grouped_mm = grouped
        xi = x.clone().requires_grad_(True)
        for rep in range(4):  # warm-up, then 3 timed
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            y = moe(xi)
            y.float().pow(2).mean().backward()
            torch.cuda.synchronize()
            if rep:
                times.setdefault(grouped, []).append(time.perf_counter() - t0)
        out[grouped] = (y.detach().float(), xi.grad.float() / 4)
    (y_grouped, g_grouped), (y_loop, g_loop) = out[True], out[False]
    return {
        "out_rel_err": float((y_grouped - y_loop).abs().max() / y_loop.abs().max()),
        "grad_rel_err": float((g_grouped - g_loop).abs().max() / g_loop.abs().max()),
        "grouped_ms": 1e3 * statistics.median(times[True]), "loop_ms": 1e3 * statistics.median(times[False]),
        "tokens": spec.layer_batch * spec.layer_seq_len, "experts": args.moe_args.num_experts,
        "top_k": args.moe_args.top_k,
    }


def measure_moe(ctx: RowContext, spec: MoeSpec) -> MoeMeasured:
    layer = moe_layer_errors(spec)
    dump = ctx.work / "moe"
    t0 = time.perf_counter()
    rc = torchrun(
        ctx, dump, CONFIGS / spec.run_config,
        "--model.flavor", spec.run_flavor, "--training.steps", str(spec.steps), "--tst.switch_step",
        str(spec.switch_step), "--training.local_batch_size", str(spec.batch), "--training.global_batch_size",
        str(spec.batch), "--training.seq_len", str(spec.seq_len), "--training.dataset", "embedded",
        "--model.hf_assets_path", "embedded", "--compile.no-enable", "--checkpoint.no-enable", "--metrics.log_freq",
        "1", "--lr_scheduler.warmup_steps", str(spec.warmup_steps),
        module=LAUNCH_MODULE, env={"GPU_CHECK_FLAVORS": "1"},
    )
    wall = time.perf_counter() - t0
    rows = loss_rows(dump)
    figures = {"layer": {k: (format_number(v) if isinstance(v, float) else v) for k, v in layer.items()},
               "run_wall_s": round(wall, 1), "run_losses": [round(r["loss"], 4) for r in rows],
               "run_positions_per_s": format_number(
                   median_or_none(r.get("throughput/positions_per_s") for r in rows[1:]), ".4g")}
    return MoeMeasured(out_rel_err=layer["out_rel_err"], grad_rel_err=layer["grad_rel_err"], exit_code=rc,
                       phases=[r.get("tst/phase") for r in rows], losses=[r["loss"] for r in rows], figures=figures)
