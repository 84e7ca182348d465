"""The training-run rows: each launches ``torchrun`` jobs and reads their metrics."""

from __future__ import annotations

import shutil
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tst_titan.analysis.fmt import format_number, max_or_none, mean_or_none, median_or_none
from tst_titan.gpucheck.criteria import ParallelMeasured, ParallelSpec
from tst_titan.gpucheck.run_criteria import (
    AsyncCkptMeasured, AsyncCkptSpec, AsyncModeMeasured, Float8Measured, Float8Spec, FusedFsdpMeasured,
    FusedFsdpSpec, Tst270mMeasured, Tst270mSpec, abs_diffs, rel_diffs,
)
from tst_titan.gpucheck.runs import (
    CONFIGS, LAUNCH_MODULE, ROOT, TINY_CONFIG, RowContext, first_run_losses, log_text, loss_rows,
    metrics_rows, offline_env, prepare_store, run_log, run_logged, step_losses, step_values, torchrun,
)

CONFIG_270M = CONFIGS / "tst_llama3_270m.toml"
CPU_ONLY = (  # toy runs of GPU_CHECK_CPU_DRY_RUN=1
    "--compile.no-enable", "--training.mixed_precision_param", "float32")


def _rounded(losses: dict[int, float], digits: int = 4) -> list[float]:
    return [round(v, digits) for v in losses.values()]


def tb_scalars(dump: Path, tags: list[str]) -> dict[str, dict[int, float]]:
    """TensorBoard scalars of a run (torchtitan's memory, MFU and data-loading tags)."""
    out: dict[str, dict[int, float]] = {t: {} for t in tags}
    for events in sorted(dump.rglob("events.out.tfevents*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        have = set(acc.Tags().get("scalars", []))
        for tag in tags:
            if tag in have:
                out[tag].update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def measure_tst_270m(ctx: RowContext, spec: Tst270mSpec) -> Tst270mMeasured:
    t0 = time.perf_counter()
    store = prepare_store(ctx, spec.vocab)
    prep_s = time.perf_counter() - t0
    dump = ctx.work / "tst_270m"
    t0 = time.perf_counter()
    rc = torchrun(
        ctx, dump, CONFIG_270M,
        "--model.flavor", spec.flavor, "--training.steps", str(spec.steps), "--tst.switch_step", str(spec.switch_step),
        "--training.local_batch_size", str(spec.batch), "--training.global_batch_size", str(spec.batch),
        "--training.seq_len", str(spec.seq_len), "--training.dataset", "store", "--training.dataset_path", str(store),
        "--model.hf_assets_path", "embedded", "--data.embedded_vocab_size", str(spec.vocab),
        "--lr_scheduler.warmup_steps", str(spec.warmup_steps), "--checkpoint.no-enable", "--metrics.log_freq", "1",
        "--metrics.enable_tensorboard", "--metrics.save_tb_folder", "tb", *(() if ctx.cuda else CPU_ONLY),
    )
    wall = time.perf_counter() - t0
    rows = loss_rows(dump)
    tb = tb_scalars(dump, ["mfu(%)", "memory/max_active(GiB)", "time_metrics/data_loading(%)", "tflops"])
    steady = {phase: [r for r in rows if r["step"] in spec.steady(phase)] for phase in (1, 2)}

    def median_of(phase: int, key: str) -> float | None:
        return median_or_none(r.get(key) for r in steady[phase])

    def tb_values(phase: int, tag: str) -> list[float]:
        return [tb[tag][r["step"]] for r in steady[phase] if r["step"] in tb[tag]]

    positions = (median_of(1, "throughput/positions_per_s"), median_of(2, "throughput/positions_per_s"))
    memory = (max_or_none(tb_values(1, "memory/max_active(GiB)")), max_or_none(tb_values(2, "memory/max_active(GiB)")))
    wait = mean_or_none(tb_values(1, "time_metrics/data_loading(%)"))
    figures = {
        "steps": spec.steps, "switch_step": spec.switch_step, "flavor": spec.flavor,
        "batch": f"{spec.batch} x {spec.seq_len} positions", "data_prep_s": round(prep_s, 1), "wall_s": round(wall, 1),
        "positions_per_s_phase1": format_number(positions[0], ".4g"),
        "positions_per_s_phase2": format_number(positions[1], ".4g"),
        "data_tokens_per_s_phase1": format_number(median_of(1, "throughput/data_tokens_per_s"), ".4g"),
        "mfu_pct_phase1": format_number(median_or_none(tb_values(1, "mfu(%)"))),
        "mfu_pct_phase2": format_number(median_or_none(tb_values(2, "mfu(%)"))),
        "tflops_phase1": format_number(median_or_none(tb_values(1, "tflops"))),
        "tflops_phase2": format_number(median_or_none(tb_values(2, "tflops"))),
        "peak_active_gib_phase1": format_number(memory[0]), "peak_active_gib_phase2": format_number(memory[1]),
        "data_wait_pct_phase1": format_number(wait),
        "loss_first_last": [rows[0]["loss"], rows[-1]["loss"]] if rows else [],
    }
    return Tst270mMeasured(cuda=ctx.cuda, exit_code=rc, losses=[r["loss"] for r in rows],
                           phases=[r.get("tst/phase") for r in rows], positions_per_s=positions,
                           peak_active_gib=memory, data_wait_pct_phase1=wait, figures=figures)


def _junit_outcomes(xml_path) -> dict[str, str]:
    """pytest's JUnit XML: test name -> 'pass', 'FAIL: <message>' or 'not run: <reason>'."""
    outcomes: dict[str, str] = {}
    if not xml_path.exists():
        return outcomes
    for case in ElementTree.parse(xml_path).getroot().iter("testcase"):
        bad = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        if bad is None:
            outcomes[case.get("name")] = "pass"
        else:
            message = (bad.get("message") or bad.tag).splitlines()[0][:200]
            outcomes[case.get("name")] = ("not run: " if bad.tag == "skipped" else "FAIL: ") + message
    return outcomes


def measure_parallel(ctx: RowContext, spec: ParallelSpec) -> ParallelMeasured:
    xml, base = ctx.work / "parallel.xml", ctx.work / "pytest"
    shutil.rmtree(base, ignore_errors=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", ROOT / spec.test_file,
           "-k", " or ".join(c.test for c in spec.cases), f"--junitxml={xml}", f"--basetemp={base}"]
    rc = run_logged(cmd, ctx.work / "parallel.log", env=offline_env(TST_SHARED_GPU="1" if ctx.cuda else "0"))
    diffs, figures = {}, {}
    for case in spec.cases:
        first, second = (first_run_losses(base, name) for name in case.runs)
        diffs[case.key] = max_or_none(abs_diffs(first, second))
        figures[case.key] = {"max_abs_loss_diff": format_number(diffs[case.key]),
                             f"{case.runs[0]}_losses": _rounded(first, 5)}
    return ParallelMeasured(pytest_exit=rc, outcomes=_junit_outcomes(xml), loss_diffs=diffs, figures=figures)


def measure_float8(ctx: RowContext, spec: Float8Spec) -> Float8Measured:
    common = ("--model.flavor", spec.flavor, "--training.steps", str(spec.steps), "--tst.switch_step",
              str(spec.switch_step), "--training.local_batch_size", str(spec.batch), "--training.global_batch_size",
              str(spec.batch), "--training.seq_len", str(spec.seq_len), "--training.dataset", "embedded",
              "--model.hf_assets_path", "embedded", "--compile.no-enable", "--checkpoint.no-enable",
              "--metrics.log_freq", "1", "--lr_scheduler.warmup_steps", str(spec.warmup_steps), "--debug.seed",
              str(spec.seed), "--activation_checkpoint.mode", "none")
    bf16, float8 = ctx.work / "bf16", ctx.work / "float8"
    rc_bf16 = torchrun(ctx, bf16, CONFIG_270M, *common)
    rc_float8 = torchrun(ctx, float8, CONFIG_270M, *common, "--model.converters", "quantize.linear.float8")
    log = log_text(run_log(float8))

    def positions_per_s(dump) -> float | None:
        return median_or_none(r.get("throughput/positions_per_s") for r in metrics_rows(dump) if r.get("step", 0) > 3)

    losses_bf16, losses_float8 = step_losses(bf16), step_losses(float8)
    diffs = abs_diffs(losses_float8, losses_bf16)
    figures = {"bf16_losses": _rounded(losses_bf16), "float8_losses": _rounded(losses_float8),
               "mean_abs_diff": format_number(mean_or_none(diffs)), "max_abs_diff": format_number(max_or_none(diffs)),
               "positions_per_s_bf16": format_number(positions_per_s(bf16), ".4g"),
               "positions_per_s_float8_eager": format_number(positions_per_s(float8), ".4g")}
    return Float8Measured(exit_codes=(rc_bf16, rc_float8), losses_bf16=losses_bf16, losses_float8=losses_float8,
                          float8_active="Float8 tensorwise scaled training active" in log,
                          emulated="emulate=True" in log, figures=figures)


def measure_async_ckpt(ctx: RowContext, spec: AsyncCkptSpec) -> AsyncCkptMeasured:
    modes, figures = {}, {}
    for mode in spec.cuda_modes if ctx.cuda else spec.modes:
        args = ("--training.steps", str(spec.steps), "--tst.switch_step", str(spec.switch_step), "--checkpoint.enable",
                "--checkpoint.interval", str(spec.interval), "--checkpoint.async_mode", mode, "--debug.deterministic",
                "--debug.deterministic_warn_only")
        ref, resumed = ctx.work / f"{mode}-ref", ctx.work / f"{mode}-resumed"
        shutil.rmtree(ref, ignore_errors=True)
        shutil.rmtree(resumed, ignore_errors=True)
        rc = torchrun(ctx, ref, TINY_CONFIG, *args)
        saved = [s for s in spec.saves() if (ref / "checkpoint" / f"step-{s}" / ".metadata").exists()]
        start = ref / "checkpoint" / f"step-{spec.resume_from}"
        rc_resumed = -1
        if (start / ".metadata").exists():
            shutil.copytree(start, resumed / "checkpoint" / start.name)
            rc_resumed = torchrun(ctx, resumed, TINY_CONFIG, *args)
        result = AsyncModeMeasured(exit_code=rc, saved_steps=saved, resume_exit=rc_resumed, losses=step_losses(ref),
                                   resumed_losses=step_losses(resumed))
        modes[mode] = result
        figures[mode] = {"saved_steps": saved,
                         "max_abs_loss_diff_after_resume": format_number(
                             max_or_none(abs_diffs(result.resumed_losses, result.losses))),
                         "losses": _rounded(result.losses, 6)}
    return AsyncCkptMeasured(modes=modes, figures=figures)


def measure_fused_fsdp_bf16(ctx: RowContext, spec: FusedFsdpSpec) -> FusedFsdpMeasured:
    global_batch = spec.batch * spec.ranks
    common = ("--model.flavor", spec.flavor, "--training.steps", str(spec.steps), "--tst.switch_step",
              str(spec.switch_step), "--training.local_batch_size", str(spec.batch), "--training.global_batch_size",
              str(global_batch), "--training.seq_len", str(spec.seq_len), "--training.dataset", "embedded",
              "--model.hf_assets_path", "embedded", "--parallelism.data_parallel_shard_degree", str(spec.ranks),
              "--training.mixed_precision_param", spec.param_dtype, "--compile.no-enable", "--checkpoint.no-enable",
              "--metrics.log_freq", "1", "--lr_scheduler.warmup_steps", str(spec.warmup_steps), "--debug.seed",
              str(spec.seed))
    fused_args = ("--tst.fused_loss", "--tst.fused_loss_chunk_size", str(spec.chunk_size))
    env = {"TST_SHARED_GPU": "1" if ctx.cuda else "0"}
    unfused, fused = ctx.work / "unfused", ctx.work / "fused"
    rc_unfused = torchrun(ctx, unfused, CONFIG_270M, *common, nproc=spec.ranks, module=LAUNCH_MODULE, env=env)
    rc_fused = torchrun(ctx, fused, CONFIG_270M, *common, *fused_args, nproc=spec.ranks, module=LAUNCH_MODULE, env=env)
    logs = [log_text(run_log(d)) for d in (unfused, fused)]
    fsdp_bf16 = all("Applied FSDP to the model" in log and "Mixed precision training is handled by fully_shard" in log
                    for log in logs)
    losses, fused_losses = step_losses(unfused), step_losses(fused)
    norms = step_values(unfused, "grad_norm").get(1), step_values(fused, "grad_norm").get(1)
    diffs = rel_diffs(fused_losses, losses)
    figures = {"losses_unfused": _rounded(losses, 5), "losses_fused": _rounded(fused_losses, 5),
               "loss_rel_diffs": [format_number(d) for d in diffs.values()],
               "step1_grad_norms": [format_number(n, ".6g") for n in norms],
               "positions_per_s_unfused": format_number(median_or_none(
                   r.get("throughput/positions_per_s") for r in loss_rows(unfused)[1:]), ".4g"),
               "positions_per_s_fused": format_number(median_or_none(
                   r.get("throughput/positions_per_s") for r in loss_rows(fused)[1:]), ".4g")}
    return FusedFsdpMeasured(
        exit_codes=(rc_unfused, rc_fused), losses=losses, fused_losses=fused_losses, first_grad_norms=norms,
        fused_phases=[r.get("tst/phase") for r in loss_rows(fused)], fsdp_bf16=fsdp_bf16,
        fused_head=f"tst.fused_loss: output projection + loss in chunks of {spec.chunk_size} positions" in logs[1],
        figures=figures)
