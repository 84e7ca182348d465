"""The benchmark scripts run and print their ratios (tiny sizes; the figures are in docs/)."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_loss_prints_ratios():
    out = _run("scripts/bench_loss.py", "--positions", "64", "--vocab", "512", "--bag", "4", "--reps", "1")
    m = re.search(r"multi_hot / one CE:\s+time ([\d.]+)x, memory ([\d.]+)x", out)
    assert m, out
    # s separate cross-entropies need more memory than the shared-logsumexp loss
    s_ratio = re.search(r"multi_hot / s CEs:\s+time [\d.]+x, memory ([\d.]+)x", out)
    assert s_ratio and float(s_ratio.group(1)) < 1.0, out


def test_bench_throughput_prints_ratios():
    out = _run("scripts/bench_throughput.py", "--flavor", "tiny", "--seq-len", "32", "--batch", "2",
               "--bag", "4", "--steps", "2")
    m = re.search(r"data tokens/s\s+TST / plain: ([\d.]+)", out)
    assert m and 1.0 < float(m.group(1)) <= 4.5, out
    assert "positions/s" in out and "share of TST step" in out
