"""The memory plan's table, and its checks against memory measured on a real run.

- :func:`plan_config` / :func:`markdown_table`: the estimates of a config for its phases
  and ``fused_loss`` settings, and the docs/RESULTS.md table with fits / does-not-fit.
- :func:`measure_step_memory`: the same step on REAL tensors (gloo or NCCL ranks, or one
  process), measured by the allocator, not by the tracker: CUDA's peak-allocated
  counters, or on the CPU the allocation and free events that c10's CPU allocator
  reports to ``torch.profiler`` (running sum of the step's events; peak over its start).
- :func:`check_measured_peak`: estimate vs a peak measured elsewhere (the GPU check's
  ``memory_plan`` row does the same with ``estimate_memory`` directly).
"""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from tst_titan.memory_plan import GIB, GPU_GIB, RESERVE_GIB, MemoryEstimate, estimate_memory
from tst_titan.memory_step import (
    build_parallel_dims,
    build_step_parts,
    cpu_flash_attention_saved,
    init_optimizer_states,
    load_job_config,
    make_batches,
    microbatches_to_track,
    prepare_for_plan,
    run_step,
)

# Estimated / measured peak accepted for a GPU run (the GPU check's memory_plan row uses
# the same band): the model runs eager in the estimate and a compiled one holds less, so
# the plan may over-estimate more than under-estimate. Not calibrated on a GPU yet.
ESTIMATE_RATIO_BAND = (0.9, 1.3)


def config_phases(job_config) -> list[int]:
    return [1, 2] if job_config.tst.enable else [2]


def plan_config(config_file: str, ngpu: int, *, overrides: tuple[str, ...] = (), tp: int | None = None,
                phases: list[int] | None = None, fused: tuple[bool, ...] = (False, True)) -> list[MemoryEstimate]:
    """Estimates of ``config_file`` for each phase it has (or ``phases``) x ``fused``."""
    out = []
    for phase in phases or config_phases(load_job_config(config_file, overrides)):
        for f in fused:
            out.append(estimate_memory(load_job_config(config_file, overrides), ngpu, phase,
                                       fused_loss=f, tp=tp))
    return out


def _gib(x: int) -> str:
    return f"{x / GIB:.1f}"


def markdown_table(rows: list[tuple[str, MemoryEstimate]], gpus: dict[str, float] = GPU_GIB) -> str:
    """``rows`` of (config name, estimate) -> a markdown table, one line per estimate."""
    head = ["config", "GPUs", "phase", "fused_loss", "microbatch (inputs)", "params+grads+AdamW",
            "activations+temps", "FSDP gathers", "**peak GiB**"]
    head += [f"fits {k} ({v:.1f} GiB)" for k, v in gpus.items()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in rows:
        b = e.breakdown
        state = sum(e.state_bytes.values())
        act = b.get("activations", 0) + b.get("temporaries", 0)
        gathers = b.get("unsharded_params", 0) + b.get("grad_buffers", 0)
        cells = [name, f"{e.ngpu}" + (f" (TP {e.tp})" if e.tp > 1 else ""), str(e.phase),
                 "on" if e.fused_loss else "off", "x".join(map(str, e.input_shape)),
                 _gib(state), _gib(act), _gib(gathers), f"**{e.peak_gib:.1f}**"]
        cells += ["yes" if e.fits(v) else "**no**" for v in gpus.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _profiled_step_peak(fn) -> int:
    """Peak bytes above the start, from the CPU allocator's events in ``torch.profiler``."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def measure_step_memory(job_config, phase: int, *, fused_loss: bool | None = None) -> dict:
    """Run the plan's step (the same program as :func:`estimate_memory`'s) on real
    tensors in this process and measure it.

    Call after ``init_process_group`` when ranks > 1 (gloo on CPU, NCCL on CUDA). Returns
    ``step_bytes`` (the step's peak over what was live when it started: the quantity of
    :attr:`MemoryEstimate.step_bytes`) and, on CUDA, ``peak_bytes`` and ``steady_bytes``.
    """
    _, loss_compiled = prepare_for_plan(job_config, fused_loss=fused_loss)
    world = dist.get_world_size() if dist.is_initialized() else 1
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    with cpu_flash_attention_saved():
        pdims = build_parallel_dims(job_config, world)
        if world > 1:
            _ = pdims.world_mesh
        parts = build_step_parts(job_config, pdims, device, loss_as_compiled=loss_compiled)
        batches = make_batches(job_config, phase, microbatches_to_track(job_config, pdims), device)
        init_optimizer_states(parts)
        gc.collect()
        out = {"device": device, "world_size": world, "phase": phase,
               "fused_loss": bool(job_config.tst.fused_loss), "microbatches": len(batches)}
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            steady = torch.cuda.memory_allocated()
            run_step(parts, batches)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            out.update(peak_bytes=peak, steady_bytes=steady, step_bytes=peak - steady)
        else:
            out["step_bytes"] = _profiled_step_peak(lambda: run_step(parts, batches))
    return out


def check_measured_peak(config_file: str, overrides: list[str] | tuple[str, ...], ngpu: int,
                        phase: int, measured_gib: float, *, fused_loss: bool | None = None,
                        band: tuple[float, float] = ESTIMATE_RATIO_BAND) -> dict:
    """Estimate a run (same config and overrides) and compare a measured peak with it.

    ``measured_gib``: the run's peak allocated (or active) GiB in ``phase`` on one rank
    (``torch.cuda.max_memory_allocated``, torchtitan's ``memory/max_active(GiB)``). Needs a
    process without a process group. ``ok`` when estimate / measured lies in ``band``.
    """
    est = estimate_memory(load_job_config(config_file, overrides), ngpu, phase, fused_loss=fused_loss)
    ratio = est.peak_gib / measured_gib if measured_gib > 0 else float("inf")
    return {"phase": phase, "estimate_gib": round(est.peak_gib, 2), "measured_gib": round(measured_gib, 2),
            "estimate_over_measured": round(ratio, 3), "band": list(band), "ok": band[0] <= ratio <= band[1],
            "estimate": est.as_dict(), "reserve_gib": RESERVE_GIB}
