"""The benchmark scripts run and print their ratios (tiny sizes; the figures are in docs/)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from tst_titan.analysis.compare import annealed_table, markdown_table
from tst_titan.analysis.runs import Run, Series
from tst_titan.analysis.speedup import annealed_speedup, equal_loss_speedup
from tst_titan.checks import check_tst
from tst_titan.errors import RunError
from tst_titan.model import TSTLlama3
from tst_titan.specs import register_specs, tst_llama3_flavors
from tst_titan.train import parse_config

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_bench_loss_prints_ratios(tmp_path):
    # eager variants only (the compiled ones compile for ~20 s each; figures in docs/)
    rows_path = tmp_path / "rows.json"
    out = _run("scripts/bench_loss.py", "--positions", "512", "--vocab", "8192", "--dim", "32", "--bag", "4",
               "--chunk", "64", "--reps", "1", "--variants", "ce_eager,s_ces_eager,mce_eager,fused_eager",
               "--json", str(rows_path))
    m = re.search(r"multi_hot / one CE:\s+time ([\d.]+)x, memory ([\d.]+)x", out)
    assert m, out
    # s separate cross-entropies need more memory than the shared-logsumexp loss
    s_ratio = re.search(r"multi_hot / s CEs:\s+time [\d.]+x, memory ([\d.]+)x", out)
    assert s_ratio and float(s_ratio.group(1)) < 1.0, out
    # the fused head never holds the [N, V] logits: less than the stock path's peak
    f = re.search(r"fused / one CE, eager:\s+time [\d.]+x, memory ([\d.]+)x", out)
    assert f and float(f.group(1)) < 0.5, out
    rows = {r["variant"]: r for r in json.loads(rows_path.read_text())}
    assert set(rows) == {"ce_eager", "s_ces_eager", "mce_eager", "fused_eager"}
    for r in rows.values():
        assert r["device"] == "cpu" and r["time_ms"] > 0 and r["peak_mem_bytes"] > 0
        assert r["max_rel_err_loss"] < 1e-4 and r["max_rel_err_grad_w"] < 2e-2  # bf16 h, W


@pytest.mark.slow
def test_bench_throughput_prints_ratios():
    out = _run("scripts/bench_throughput.py", "--flavor", "tiny", "--seq-len", "32", "--batch", "2",
               "--bag", "4", "--steps", "2")
    m = re.search(r"data tokens/s\s+TST / plain: ([\d.]+)", out)
    # Timing ratios are measurements, not test outcomes (figures in docs/RESULTS.md): a
    # loaded CI machine can skew tiny-model timings either way, so only sanity is checked.
    assert m and float(m.group(1)) > 0, out
    assert "positions/s" in out and "share of TST step" in out


def test_compare_runs_equal_loss_speedup_against_a_naive_reading():
    """Interpolated crossing of the baseline's final loss, on hand-made curves."""

    def run(name, steps, loss, switch=None):
        steps = np.array(steps)
        lin = Series(steps, steps * 10.0)
        return Run(name, Series(steps, np.array(loss)), lin, Series(steps, steps * 2.0), lin, switch)

    base = run("base", [10, 20, 30, 40], [5.0, 4.0, 3.5, 3.0])
    tst = run("tst", [10, 20, 30, 40], [5.5, 3.4, 2.8, 2.5], switch=12)
    su = equal_loss_speedup(base, tst)
    # loss 3.0 first reached between step 20 (3.4) and 30 (2.8): 20 + 10 * 0.4 / 0.6
    assert su.step == pytest.approx(20 + 10 * 0.4 / 0.6)
    assert su.steps == pytest.approx(40 / su.step) and su.flops == pytest.approx(40 / su.step)
    never = run("never", [10, 20], [6.0, 5.0])
    assert equal_loss_speedup(base, never).step is None
    assert "not reached" in markdown_table([base, never], base)


def test_compare_runs_annealed_speedup_against_a_naive_reading():
    """Equal-loss read on baselines trained for different lengths: log-linear between their final
    losses, extrapolated past them (and marked), against a hand computation."""

    def run(name, final, loss, switch=None):
        steps = np.array([1, final])
        lin = Series(steps, steps * 10.0)
        return Run(name, Series(steps, np.array([8.0, loss])), lin, Series(steps, steps * 2.0), lin, switch)

    b1, b2, b3 = run("b1", 100, 4.0), run("b2", 200, 3.5), run("b3", 400, 3.2)
    inside = annealed_speedup([b3, b1, b2], run("t", 200, 3.3, switch=60))
    # between b2 (3.5 at 200) and b3 (3.2 at 400): log2(steps/200) = 0.2 / 0.3
    want = 200 * 2 ** (0.2 / 0.3)
    assert inside.baseline_steps == pytest.approx(want) and not inside.extrapolated
    assert inside.steps == pytest.approx(want / 200) and inside.flops == pytest.approx(want / 200)
    beyond = annealed_speedup([b1, b2, b3], run("t", 200, 3.0, switch=60))
    assert beyond.extrapolated and beyond.baseline_steps == pytest.approx(400 * 2 ** (0.2 / 0.3))
    worse = annealed_speedup([b1, b2], run("t", 100, 4.5, switch=30))
    assert worse.extrapolated and worse.baseline_steps == pytest.approx(100 * 2 ** (-0.5 / 0.5))
    flat = annealed_speedup([b1, run("b2", 200, 4.1)], run("t", 100, 3.0, switch=30))
    assert flat.baseline_steps is None
    with pytest.raises(RunError):
        annealed_speedup([b1, run("again", 100, 3.9)], run("t", 100, 3.0, switch=30))
    table = annealed_table([b1, b2, b3, run("tst", 200, 3.0, switch=60)])
    row = next(line for line in table.splitlines() if line.startswith("| tst |"))
    assert f"| {400 * 2 ** (0.2 / 0.3):.0f} (extrapolated) | {2 * 2 ** (0.2 / 0.3):.2f}x |" in row
    assert annealed_table([b1, run("tst", 200, 3.0, switch=60)]) == ""  # one length: no table


def test_study_configs_are_twins_that_differ_only_in_tst():
    """The data-rich CPU study's configs: same run but [tst] (and [job]'s folder/description)."""
    base_f, tst_f = ROOT / "train_configs" / "study_cpu.toml", ROOT / "train_configs" / "tst_study_cpu.toml"
    base, tst = tomllib.loads(base_f.read_text()), tomllib.loads(tst_f.read_text())
    assert set(base) == set(tst)
    for section in set(base) - {"job", "tst"}:
        assert base[section] == tst[section], section
    assert base["tst"] == {"enable": False}
    assert tst["tst"]["bag_size"] == 6 and tst["tst"]["superposition_ratio"] == 0.3
    # the comment gives the command that prepares the stores the configs read
    for text in (base_f.read_text(), tst_f.read_text()):
        assert "scripts/prepare_data.py --source python_env --packages torch --split train" in text
        assert "--out ./data/pystd-torch-train" in text and "--out ./data/pystd-torch-val" in text
    register_specs()
    for f in (base_f, tst_f):
        cfg = parse_config(["--job.config_file", str(f)])
        check_tst(cfg)
        assert cfg.model.flavor == "study" and cfg.training.dataset == "store"
        assert cfg.validation.dataset == "store" and cfg.checkpoint.enable
        assert cfg.training.mixed_precision_param == "float32"
    with torch.device("meta"):
        model = TSTLlama3(tst_llama3_flavors["study"])
    assert sum(p.numel() for p in model.parameters()) == 1_377_408
    with torch.device("meta"):  # the second size: 4x fewer non-embedding parameters
        small = TSTLlama3(tst_llama3_flavors["study_small"])
    emb = small.tok_embeddings.weight.numel() + small.output.weight.numel()
    assert sum(p.numel() for p in small.parameters()) - emb == 213_568
