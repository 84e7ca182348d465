"""The GPU check kit (tst_titan.gpucheck).

On a machine without CUDA ``bash scripts/gpu_check.sh`` runs the rows that need no GPU
(preflight, and the asynchronous-checkpoint save and exact resume) and marks every other
row "not run: no CUDA"; on the lent GPU machine the same command runs them all. The
rows' pass/fail logic is checked here on fabricated measurements: the thresholds are
written once in each row's spec, and both the report's criteria and the checks come
from them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from tst_titan.gpucheck.criteria import LossMeasured, LossSpec, verdict
from tst_titan.gpucheck.rows import ROW_BY_NAME, ROWS
from tst_titan.gpucheck.run_criteria import (
    FusedFsdpMeasured, FusedFsdpSpec, MemoryPlanMeasured, MemoryPlanSpec, Tst270mMeasured, Tst270mSpec,
)

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, run the kit itself (9 minutes)")
GIB = 2**30


@pytest.mark.slow
@no_cuda
def test_kit_on_cpu_reports_every_row_and_passes_the_cpu_rows(tmp_path):
    out = tmp_path / "report"
    env = {**os.environ, "GPU_CHECK_WORK": str(tmp_path / "work")}
    env.pop("GPU_CHECK_CPU_DRY_RUN", None)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert list(rows) == [r.name for r in ROWS]
    for row in ROWS:
        want = "not run: no CUDA" if row.cuda_only else "pass"
        assert rows[row.name]["status"] == want, (row.name, rows[row.name])
        assert f"| {row.name} | {want} |" in report
        assert f"Pass criteria: {row.criteria}" in report
    assert {r.name for r in ROWS if not r.cuda_only} == {"preflight", "async_ckpt"}
    # the async row really saved asynchronously and resumed exactly
    fig = rows["async_ckpt"]["figures"]["async"]
    assert fig["saved_steps"] == [2, 4, 6, 8] and fig["max_abs_loss_diff_after_resume"] == "0"
    assert rows["preflight"]["figures"]["torchtitan"] == "0.2.2"
    assert "===== async_ckpt: pass" in (out / "rows.log").read_text()


@pytest.mark.slow
@no_cuda
def test_a_row_over_its_budget_fails_the_kit(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--out", str(out), "--work", str(tmp_path / "work"),
         "--only", "preflight", "--budget", "preflight=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows["preflight"]["status"] == "FAIL: timed out after 1 s"
    assert rows["async_ckpt"]["status"] == "not run: not selected (--only)"
    assert "| preflight | FAIL: timed out after 1 s |" in (out / "report.md").read_text()


# -- criteria and checks from one set of numbers (fabricated measurements) ------------


def _fused(spec: FusedFsdpSpec, **changes) -> FusedFsdpMeasured:
    """A fused_fsdp_bf16 measurement that passes ``spec``, then ``changes``."""
    losses = {s: 10.0 - 0.1 * s for s in range(1, spec.steps + 1)}
    fused = {s: v * (1 + 0.5 * spec.max_first_loss_rel_diff) for s, v in losses.items()}
    good = FusedFsdpMeasured(
        exit_codes=(0, 0), losses=losses, fused_losses=fused, first_grad_norms=(2.0, 2.0 * 1.001),
        fused_phases=[1] * spec.switch_step + [2] * (spec.steps - spec.switch_step), fsdp_bf16=True, fused_head=True)
    return dataclasses.replace(good, **changes)


def _failed(spec, measured) -> list[str]:
    return [c.text for c in spec.checks(measured) if not c.passed]


def test_fused_fsdp_criteria_and_checks_use_the_same_tolerances():
    spec = ROW_BY_NAME["fused_fsdp_bf16"].spec
    assert isinstance(spec, FusedFsdpSpec) and ROW_BY_NAME["fused_fsdp_bf16"].cuda_only
    text = spec.criteria()
    for value in (spec.max_first_loss_rel_diff, spec.max_first_grad_norm_rel_diff, spec.max_loss_rel_diff):
        assert format(value, "g") in text
    assert f"{spec.switch_step} + {spec.steps - spec.switch_step} steps" in text
    assert verdict(spec.checks(_fused(spec))) [0] == "pass"

    # a later step just inside / just outside the all-steps tolerance
    inside = _fused(spec)
    inside.fused_losses[spec.steps] = inside.losses[spec.steps] * (1 + 0.99 * spec.max_loss_rel_diff)
    assert _failed(spec, inside) == []
    outside = _fused(spec)
    outside.fused_losses[spec.steps] = outside.losses[spec.steps] * (1 + 1.01 * spec.max_loss_rel_diff)
    assert [t.split(" (")[0] for t in _failed(spec, outside)] == [
        f"every step's loss within {spec.max_loss_rel_diff:g} of the unfused run"]
    # step 1 has a tighter tolerance than the later steps
    first = _fused(spec)
    first.fused_losses[1] = first.losses[1] * (1 + 2 * spec.max_first_loss_rel_diff)
    assert len(_failed(spec, first)) == 1 and _failed(spec, first)[0].startswith("step-1 loss")
    norm = _fused(spec, first_grad_norms=(2.0, 2.0 * (1 + 2 * spec.max_first_grad_norm_rel_diff)))
    assert len(_failed(spec, norm)) == 1 and _failed(spec, norm)[0].startswith("step-1 grad norm")

    # no switch, a NaN, a crashed run, FSDP or the fused head missing: each fails on its own
    assert _failed(spec, _fused(spec, fused_phases=[1] * spec.steps))[0].startswith("fused run: phase 1")
    nan = _fused(spec)
    nan.fused_losses[3] = math.nan
    assert any(t.startswith("both runs finish") for t in _failed(spec, nan))
    assert _failed(spec, _fused(spec, exit_codes=(0, 1)))[0].startswith("both runs finish")
    assert _failed(spec, _fused(spec, fsdp_bf16=False)) == [
        "FSDP applied, mixed precision handled by fully_shard, in both runs"]
    assert _failed(spec, _fused(spec, fused_head=False))[0].startswith("fused head active")

    # the same numbers, changed once, move both the prose and the verdict
    strict = dataclasses.replace(spec, max_loss_rel_diff=spec.max_first_loss_rel_diff / 10)
    assert format(strict.max_loss_rel_diff, "g") in strict.criteria()
    assert verdict(strict.checks(_fused(spec)))[0].startswith("FAIL: every step's loss within")


def _memory(spec: MemoryPlanSpec, peaks: dict, estimates: dict, error: str | None = None) -> MemoryPlanMeasured:
    return MemoryPlanMeasured(exit_code=0, phases=[1] * spec.switch_step + [2] * (spec.steps - spec.switch_step),
                              peak_bytes=peaks, estimate_bytes=estimates, estimate_error=error)


def test_memory_plan_checks_the_estimate_of_each_phase_against_the_measured_peak():
    spec = ROW_BY_NAME["memory_plan"].spec
    assert isinstance(spec, MemoryPlanSpec) and ROW_BY_NAME["memory_plan"].cuda_only
    text = spec.criteria()
    assert format(spec.min_estimate_ratio, "g") in text and format(spec.max_estimate_ratio, "g") in text
    assert "torch.cuda.max_memory_allocated" in text
    peaks = {1: 40 * GIB, 2: 38 * GIB}
    ok = _memory(spec, peaks, {1: int(40 * GIB * 1.1), 2: 38 * GIB})
    assert verdict(spec.checks(ok))[0] == "pass"
    # under the lower bound in phase 2 only
    low = _memory(spec, peaks, {1: 40 * GIB, 2: int(38 * GIB * (spec.min_estimate_ratio - 0.01))})
    assert [t.split(":")[0] for t in _failed(spec, low)] == ["phase 2"]
    # over the upper bound in phase 1 only
    high = _memory(spec, peaks, {1: int(40 * GIB * (spec.max_estimate_ratio + 0.01)), 2: 38 * GIB})
    assert [t.split(":")[0] for t in _failed(spec, high)] == ["phase 1"]
    # no estimate: the measured peaks still pass their own checks, the row fails
    none = _memory(spec, peaks, {1: None, 2: None}, error="not available (NotImplementedError: ...)")
    assert _failed(spec, none) == ["memory plan estimate: not available (NotImplementedError: ...)"]
    # no measured peak (the run never logged one)
    missing = _memory(spec, {1: None, 2: 38 * GIB}, {1: 40 * GIB, 2: 38 * GIB})
    assert len(_failed(spec, missing)) == 2  # the peak, and the ratio it would have made


def test_tst_270m_criteria_and_steady_steps_come_from_the_spec():
    spec = Tst270mSpec()
    assert "steps 6-20 vs 26-40" in spec.criteria()
    assert list(spec.steady(1)) == list(range(6, 21)) and list(spec.steady(2)) == list(range(26, 41))
    good = Tst270mMeasured(cuda=True, exit_code=0, losses=[10.0] * 40, phases=[1] * 20 + [2] * 20,
                           positions_per_s=(96.0, 100.0), peak_active_gib=(50.0, 49.0), data_wait_pct_phase1=1.0)
    assert verdict(spec.checks(good))[0] == "pass"
    slow = dataclasses.replace(good, positions_per_s=(94.0, 100.0))
    assert [t.split(" (")[0] for t in _failed(spec, slow)] == ["phase-1 positions/s >= 0.95 x phase 2"]
    assert verdict(dataclasses.replace(spec, min_phase1_speed=0.9).checks(slow))[0] == "pass"
    # on CPU (dry run) only the run itself is checked
    assert len(spec.checks(dataclasses.replace(slow, cuda=False))) == 2


def test_loss_ratio_limits_are_checked_as_written():
    spec = LossSpec()
    row = {"max_rel_err_loss": 1e-4, "max_rel_err_grad_h": 1e-3, "max_rel_err_grad_w": 1e-3}
    results = {v: {**row, "variant": v, "time_ms": 10.0, "peak_mem_bytes": 100} for v in spec.variants}
    results["fused_compiled"].update(peak_mem_bytes=40)
    assert verdict(spec.checks(LossMeasured(0, results)))[0] == "pass"
    results["fused_compiled"].update(peak_mem_bytes=60)  # over its 0.5x memory limit
    assert _failed(spec, LossMeasured(0, results)) == ["fused_compiled peak memory <= 0.5x ce_compiled (0.60x)"]
    assert "fused_compiled <= 1.3x ce_compiled in time and <= 0.5x ce_compiled in peak memory" in spec.criteria()
    del results["mce_eager"]
    assert _failed(spec, LossMeasured(0, results))[0].startswith("bench_loss.py exits 0 and returns")


def test_every_row_has_criteria_a_title_and_a_measuring_function():
    for row in ROWS:
        assert row.criteria and row.title and callable(row.measure_fn()), row.name
        assert row.budget_s > 0
