"""The GPU check kit on a machine without CUDA: every row reported, CUDA rows "not run".

On CPU ``bash scripts/gpu_check.sh`` runs the rows that need no GPU (preflight, and the
asynchronous-checkpoint save and exact resume) and marks every other row
"not run: no CUDA"; on the lent GPU machine the same command runs them all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, run the kit itself (9 minutes)")


def test_kit_on_cpu_reports_every_row_and_passes_the_cpu_rows(tmp_path):
    out = tmp_path / "report"
    env = {**os.environ, "GPU_CHECK_WORK": str(tmp_path / "work")}
    env.pop("GPU_CHECK_CPU_DRY_RUN", None)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert list(rows) == [r.name for r in gpu_check.ROWS]
    for row in gpu_check.ROWS:
        want = "not run: no CUDA" if row.cuda_only else "pass"
        assert rows[row.name]["status"] == want, (row.name, rows[row.name])
        assert f"| {row.name} | {want} |" in report
        assert f"Pass criteria: {row.criteria}" in report
    assert {r.name for r in gpu_check.ROWS if not r.cuda_only} == {"preflight", "async_ckpt"}
    # the async row really saved asynchronously and resumed exactly
    fig = rows["async_ckpt"]["figures"]["async"]
    assert fig["saved_steps"] == [2, 4, 6, 8] and fig["max_abs_loss_diff_after_resume"] == "0"
    assert rows["preflight"]["figures"]["torchtitan"] == "0.2.2"
    assert "===== async_ckpt: pass" in (out / "rows.log").read_text()


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
