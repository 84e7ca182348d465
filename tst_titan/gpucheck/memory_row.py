"""The memory_plan row: measured peak GPU memory of each phase against the memory plan.

A module of its own so that the estimator's imports (fake tensors, memory trackers)
load only in this row's process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tst_titan.analysis.fmt import format_number
from tst_titan.gpucheck.run_criteria import MemoryPlanMeasured, MemoryPlanSpec, gib
from tst_titan.gpucheck.runs import CONFIGS, LAUNCH_MODULE, PEAK_ALLOCATED_KEY, RowContext, loss_rows, torchrun
from tst_titan.memory_plan import estimate_memory, load_job_config


def estimate_peak_bytes(config: Path, overrides: Sequence[str], phase: int, ngpu: int) -> int:
    """The memory plan's peak bytes on one of ``ngpu`` ranks for a step of ``phase`` of the
    run ``config`` + ``overrides`` (:func:`tst_titan.memory_plan.estimate_memory`)."""
    return estimate_memory(load_job_config(str(config), list(overrides)), ngpu, phase).peak_bytes


def memory_plan_overrides(spec: MemoryPlanSpec) -> list[str]:
    """The run's command-line overrides of its config (the estimate is asked about the same)."""
    return ["--model.flavor", spec.flavor, "--training.steps", str(spec.steps), "--tst.switch_step",
            str(spec.switch_step), "--training.local_batch_size", str(spec.batch), "--training.global_batch_size",
            str(spec.batch * spec.ngpu), "--training.seq_len", str(spec.seq_len), "--training.dataset", "embedded",
            "--model.hf_assets_path", "embedded", "--checkpoint.no-enable", "--metrics.log_freq", "1",
            "--lr_scheduler.warmup_steps", str(spec.warmup_steps),
            *(() if spec.compile else ("--compile.no-enable",))]


def measure_memory_plan(ctx: RowContext, spec: MemoryPlanSpec) -> MemoryPlanMeasured:
    overrides = memory_plan_overrides(spec)
    if not ctx.cuda:  # GPU_CHECK_CPU_DRY_RUN=1: plumbing only
        overrides += ["--training.mixed_precision_param", "float32"]
    dump = ctx.work / "memory_plan"
    rc = torchrun(ctx, dump, CONFIGS / spec.config, *overrides, nproc=spec.ngpu, module=LAUNCH_MODULE,
                  env={"GPU_CHECK_PEAK_MEMORY": "1"})
    rows = loss_rows(dump)
    peaks = {phase: max((r[PEAK_ALLOCATED_KEY] for r in rows if r.get("tst/phase") == phase
                         and PEAK_ALLOCATED_KEY in r), default=None) for phase in (1, 2)}
    estimates: dict[int, int | None] = {1: None, 2: None}
    error = None
    try:
        for phase in (1, 2):
            estimates[phase] = int(estimate_peak_bytes(CONFIGS / spec.config, overrides, phase, spec.ngpu))
    except Exception as e:  # noqa: BLE001 - the measured peaks are reported either way
        error = f"failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
    figures = {"overrides": " ".join(overrides),
               "per_step_peak_allocated_gib": {r["step"]: format_number(gib(r.get(PEAK_ALLOCATED_KEY)), ".3f")
                                               for r in rows},
               **{f"peak_allocated_gib_phase{p}": format_number(gib(peaks[p]), ".3f") for p in (1, 2)},
               **{f"estimate_gib_phase{p}": format_number(gib(estimates[p]), ".3f") for p in (1, 2)}}
    return MemoryPlanMeasured(exit_code=rc, phases=[r.get("tst/phase") for r in rows], peak_bytes=peaks,
                              estimate_bytes=estimates, estimate_error=error, figures=figures)
