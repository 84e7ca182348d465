"""The quality study's statistics (against hand computations), its runner (a real smoke
study: resumable, two runs side by side) and its report (regenerated from raw results;
the committed RESULTS section must be what the committed raw results give)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from tst_titan.analysis import stats
from tst_titan.analysis.study.plan import study_plan
from tst_titan.analysis.study.report import (BEGIN, END, build_report, pooled_speedup_lines, pooled_speedup_rows,
                                             speedup_rows, speedup_summary,
                                             speedup_table_row, total_gap_se)
from tst_titan.analysis.study.results import RunResult, load_clusters, load_results


def test_clustered_se_against_a_hand_computation():
    x = [1.0, 2.0, 4.0, 3.0, 5.0, 9.0]
    g = [0, 0, 1, 1, 2, 2]
    m = sum(x) / 6
    sums = [x[0] + x[1] - 2 * m, x[2] + x[3] - 2 * m, x[4] + x[5] - 2 * m]
    want = math.sqrt(3 / 2 * sum(s * s for s in sums) / 36)
    assert stats.clustered_se(x, g) == pytest.approx(want)
    # one observation per cluster: the i.i.d. standard error sd / sqrt(n)
    assert stats.clustered_se(x, range(6)) == pytest.approx(np.std(x, ddof=1) / math.sqrt(6))
    assert math.isnan(stats.clustered_se(x, [0] * 6))


def test_cluster_jackknife_against_a_hand_computation():
    x = [1.0, 2.0, 4.0, 3.0, 5.0, 9.0, 7.0]
    g = [0, 0, 1, 1, 2, 2, 2]
    loo = [(4 + 3 + 5 + 9 + 7) / 5, (1 + 2 + 5 + 9 + 7) / 5, (1 + 2 + 4 + 3) / 4]  # mean without each file
    m = sum(loo) / 3
    want = math.sqrt(2 / 3 * sum((v - m) ** 2 for v in loo))
    assert stats.cluster_jackknife_se(x, g) == pytest.approx(want)
    # one observation per cluster: exactly sd / sqrt(n)
    assert stats.cluster_jackknife_se(x, range(7)) == pytest.approx(np.std(x, ddof=1) / math.sqrt(7))
    assert math.isnan(stats.cluster_jackknife_se(x, [0] * 7))
    assert stats.effective_clusters([0, 0, 1, 1]) == pytest.approx(2.0)
    assert stats.effective_clusters([0, 0, 0, 1]) == pytest.approx(1 / (0.75**2 + 0.25**2))


def test_loglinear_and_power_law_reads():
    steps, loss = [1200, 2400, 4800], [3.8, 3.5, 3.3]
    n, extra = stats.loglinear_steps(steps, loss, 3.4)
    assert n == pytest.approx(2400 * 2 ** 0.5) and not extra  # halfway in log steps
    n, extra = stats.loglinear_steps(steps, loss, 3.2)
    assert extra and n == pytest.approx(4800 * 2 ** 0.5)
    assert stats.loglinear_steps([1, 2], [3.0, 3.1], 2.0) == (None, False)  # not falling
    law = stats.PowerLaw(2.0, 50.0, 0.5)
    ns = [300, 1200, 2400, 4800]
    fit = stats.fit_power_law(ns, [law.loss(n) for n in ns])
    assert fit.a == pytest.approx(2.0, abs=1e-3) and fit.c == pytest.approx(0.5, abs=1e-2)
    assert fit.steps_at(law.loss(3000)) == pytest.approx(3000, rel=1e-2)
    assert stats.fit_power_law([1, 2], [3.0, 2.0]) is None
    assert fit.n_points == 4 and not fit.at_grid_edge
    three = stats.fit_power_law([1200, 2400, 4800], [3.8, 3.5, 3.3])
    assert three.n_points == 3  # the report says "exact fit": 3 points, 3 parameters
    assert stats.fit_power_law([1, 2, 4], [3.0, 2.9, 2.8]).at_grid_edge  # log-linear: c -> 0


def test_crossover_and_its_interval():
    x = [1.0, 2.0, 4.0]
    gaps = [[0.2, 0.2], [0.1, 0.1], [-0.1, -0.1]]  # no seed noise, no held-out error: a point
    c = stats.crossover(x, gaps)
    want = math.exp(math.log(2) + 0.5 * math.log(2))  # halfway between 2 and 4 in log
    assert c.estimate == pytest.approx(want) and c.lo == pytest.approx(want) and c.hi == pytest.approx(want)
    # the pooled seed sd by hand: 2 + 1 + 3 seeds -> 1 + 0 + 2 degrees of freedom
    c = stats.crossover(x, [[0.3, 0.1], [0.2], [-0.1, -0.3, -0.2]], [0.01, 0.01, 0.01])
    assert c.df == 3 and c.seed_sd == pytest.approx(math.sqrt((0.02 + 0.02) / 3))
    assert c.lo < c.estimate < c.hi
    # out of range on either side; no seed pairs -> no interval
    assert stats.crossover(x, [[-1.0], [-1.0], [-1.0]]).estimate == -math.inf  # TST wins everywhere
    assert stats.crossover(x, [[1.0], [1.0], [0.5]]).estimate == math.inf  # TST behind everywhere
    assert math.isnan(stats.crossover(x, [[1.0], [0.5], [-0.5]]).lo)
    # the gap only rising through 0 (TST ahead early, behind later) is no crossover
    assert math.isnan(stats.crossover(x, [[-0.1], [0.1], [0.2]]).estimate)
    # the measured lengths around the crossing
    assert stats.crossover([0.5, 1.0, 2.0, 4.0], [[0.3], [0.2], [0.1], [-0.1]]).bracket == (2.0, 4.0)


def test_crossover_interval_covers_the_truth_about_95_percent():
    """Three seeds per length, gap linear in log(x) through 0 at x = 2: the 95% interval
    holds the true crossover in about 95% of simulated studies."""
    rng = np.random.default_rng(1)
    x = np.array([0.5, 1.0, 2.0, 4.0])
    true_gap = -0.1 * np.log2(x / 2.0)
    hits = 0
    for trial in range(200):
        gaps = [list(g + 0.03 * rng.standard_normal(3)) for g in true_gap]
        c = stats.crossover(x, gaps, n_draws=1000, seed=trial)
        hits += c.lo <= 2.0 <= c.hi
    assert 0.88 <= hits / 200 <= 0.995


def test_study_plan_priorities():
    plan = study_plan()
    names = [s.name for s in plan]
    assert len(names) == len(set(names))
    # the claims' lengths come first, 3 seeds each, then the second size, the ladder, the long TST
    assert names[:6] == [f"study_{a}_1200_seed{k}" for k in range(3) for a in ("baseline", "tst_s6")]
    for steps in (2400, 3300, 4800):
        assert {f"study_baseline_{steps}_seed{k}" for k in range(3)} <= set(names)
    assert {"study_tst_s6_4800_seed0", "study_tst_s6_4800_seed1"} <= set(names)
    # the long TST run of a seed comes with the baseline that brackets it, seed by seed
    i = names.index("study_tst_s6_4800_seed0")
    assert names[i:i + 4] == ["study_tst_s6_4800_seed0", "study_baseline_7200_seed0",
                              "study_tst_s6_4800_seed1", "study_baseline_7200_seed1"]
    small = [s for s in plan if s.size == "small"]
    assert sorted({s.steps for s in small}) == [300, 600, 1200] and len(small) == 18
    assert "--model.flavor" in small[0].overrides() and "study_small" in small[0].overrides()
    assert names.index("small_tst_s6_1200_seed2") < names.index("study_baseline_3300_seed0")


@pytest.mark.slow
def test_smoke_study_runs_resumes_and_reports(tmp_path):
    """7 tiny runs, 2 at a time: raw results, a rerun keeps them, and the report."""
    res, work, report = tmp_path / "results", tmp_path / "work", tmp_path / "RESULTS.md"
    report.write_text(f"# Results\n\nbefore\n\n{BEGIN}\nold\n{END}\n\nafter\n")
    cmd = [sys.executable, "scripts/bench_quality.py", "--smoke", "--jobs", "2", "--results", str(res),
           "--work", str(work), "--report", str(report), "--img", str(tmp_path / "img")]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "ETA" in first.stdout
    runs = load_results(res)
    assert len(runs) == 7
    raw = runs["study_tst_s6_8_seed1"].raw
    assert raw["final_loss"] == raw["val"][-1][1] and raw["val"][-1][0] == 8
    assert raw["switch_step"] == 2 and raw["bag_size"] == 6 and raw["spec"]["seed"] == 1
    assert len(raw["final_sequence_losses"]) == 8  # 2 validation steps x 4 sequences
    # the per-sequence losses are what the validator averaged
    assert np.mean(raw["final_sequence_losses"]) == pytest.approx(raw["final_loss"], rel=1e-4)
    assert "--debug.seed 1" in raw["command"] and "--data.shuffle_seed 1001" in raw["command"]
    text = report.read_text()
    assert text.startswith("# Results\n\nbefore\n\n" + BEGIN) and text.endswith(END + "\n\nafter\n")
    assert "| 8 | " in text and "(2 seeds)" in text and "Equal-loss speed-up" in text
    assert (tmp_path / "img" / "study_gap.png").stat().st_size > 10_000
    # two at a time: runs shared the cores
    assert any(r for r in text.splitlines() if r.startswith("| study_baseline_8_seed0 ") and not r.endswith("| - |"))
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done earlier, kept") == 7
    assert report.read_text() == text  # the same raw results give the same report

    # a finished run rerun from scratch is the committed result, bit for bit; a doctored one is not
    rep = cmd[:3] + cmd[5:] + ["--reproduce", "study_tst_s6_8_seed0"]
    same = subprocess.run(rep, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert same.returncode == 0 and "study_tst_s6_8_seed0: identical to the committed result" in same.stdout, \
        same.stdout[-2000:] + same.stderr[-2000:]
    doctored = json.loads((res / "study_tst_s6_8_seed0.json").read_text())
    doctored["final_sequence_losses"][3] += 1e-5
    (res / "study_tst_s6_8_seed0.json").write_text(json.dumps(doctored))
    differs = subprocess.run(rep, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert differs.returncode == 1 and "DIFFERS" in differs.stdout and "final_sequence_losses" in differs.stdout

    # compare_runs on a finished pair of the study (its run folders)
    base_dir, tst_dir = work / "runs" / "study_baseline_8_seed0", work / "runs" / "study_tst_s6_8_seed0"
    cmp = subprocess.run([sys.executable, "scripts/compare_runs.py", str(base_dir), str(tst_dir),
                          "--out", str(tmp_path / "cmp")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert cmp.returncode == 0, cmp.stderr[-3000:]
    rows = [line for line in cmp.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| run | TST | final step | final val loss |") and len(rows) == 3
    assert rows[2].startswith("| study_tst_s6_8_seed0 | s=6, switch after 2 | 8 | ")
    # data tokens read: the TST run reads 6x per phase-1 step (2 of 8 steps)
    base_tokens = int(rows[1].split("|")[-2].replace(",", ""))
    tst_tokens = int(rows[2].split("|")[-2].replace(",", ""))
    assert tst_tokens * 8 == base_tokens * (2 * 6 + 6)
    assert (tmp_path / "cmp" / "compare.png").exists() and (tmp_path / "cmp" / "compare.md").exists()

    # the phase plan and the data budget are in TensorBoard as text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next(tst_dir.rglob("events.out.tfevents*"))))
    acc.Reload()
    tag = next(t for t in acc.Tags()["tensors"] if t.startswith("tst/plan"))
    plan_text = acc.Tensors(tag)[0].tensor_proto.string_val[0].decode()
    assert "TST plan: phase 1 (superposition, s=6" in plan_text and "data budget:" in plan_text
    assert "(phase 1: " in plan_text and "epochs)" in plan_text

    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "scripts/compare_runs.py", str(tmp_path / "empty")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "no TensorBoard event files" in proc.stderr


def test_committed_results_section_is_regenerated_from_the_raw_results():
    """docs/RESULTS.md's study section is exactly what the committed raw results give."""
    results_dir = ROOT / "docs" / "results" / "study"
    results = load_results(results_dir)
    doc = (ROOT / "docs" / "RESULTS.md").read_text()
    assert BEGIN in doc and END in doc
    committed = BEGIN + doc.split(BEGIN, 1)[1].split(END, 1)[0] + END
    regenerated = build_report(results, load_clusters(results_dir), study_plan(),
                               "python scripts/bench_quality.py --report-only")
    assert committed.strip() == regenerated.strip()
    for r in results.values():  # every raw result names its commit, seed and config
        assert r.raw["commit"] and r.raw["command"].startswith("python -m tst_titan.train")
        json.dumps(r.raw)


def test_a_study_refuses_runs_on_other_data_than_its_finished_runs(tmp_path):
    from tst_titan.analysis.study.plan import smoke_plan
    from tst_titan.analysis.study.runner import StudySettings, check_same_data, stores_of
    from tst_titan.errors import RunError

    spec = smoke_plan()[0]
    settings = StudySettings(work=tmp_path, results=tmp_path)
    same = stores_of(spec, settings)
    check_same_data(same, spec, settings)  # the same stores: fine
    other = {**same, "train_store": {"path": "./data/x", "num_tokens": 5, "source": {"corpus": "abc"}}}
    with pytest.raises(RunError, match="train_store: .* but the finished runs read 5 tokens of corpus abc"):
        check_same_data(other, spec, settings)


def test_a_rerun_keeps_the_committed_results_beside_the_clusters_file(tmp_path):
    """The committed results folder also holds validation_clusters.json: a rerun reads past it
    and starts nothing that is done."""
    from tst_titan.analysis.study.runner import StudySettings, run_plan

    results_dir = ROOT / "docs" / "results" / "study"
    done = load_results(results_dir)
    assert (results_dir / "validation_clusters.json").is_file() and done
    plan = [s for s in study_plan() if s.name in done]
    said: list[str] = []
    failed = run_plan(plan, StudySettings(work=tmp_path, results=results_dir), log=said.append)
    assert failed == [] and sum("done earlier, kept" in line for line in said) == len(plan)
    assert not (tmp_path / "runs").exists()


def test_clusters_file_is_left_alone_unless_a_python_env_held_out_set_needs_it(tmp_path):
    """The runner writes validation_clusters.json once, and only for a python_env held-out
    store (its documents name their source files)."""
    from tst_titan.analysis.study.plan import smoke_plan
    from tst_titan.analysis.study.runner import StudySettings, ensure_clusters

    spec = smoke_plan()[0]
    s = StudySettings(work=tmp_path / "w", results=tmp_path)
    raw = {"val_store": {"path": "x", "source": {"kind": "embedded"}}, "final_sequence_losses": [1.0, 2.0]}
    assert ensure_clusters(spec, raw, s) is None and not (tmp_path / "validation_clusters.json").exists()
    (tmp_path / "validation_clusters.json").write_text("{}")
    raw["val_store"]["source"]["kind"] = "python_env"
    assert ensure_clusters(spec, raw, s) is None
    assert (tmp_path / "validation_clusters.json").read_text() == "{}"


def _run(arm: str, steps: int, seed: int, loss: float) -> RunResult:
    name = f"study_{arm}_{steps}_seed{seed}"
    return RunResult({"name": name, "final_loss": loss,
                      "spec": {"size": "study", "arm": arm, "steps": steps, "seed": seed, "group": "main"}})


def test_speedup_reads_bound_what_their_ladder_does_not_bracket():
    runs = [_run("baseline", 1200, 0, 3.60), _run("baseline", 2400, 0, 3.40), _run("baseline", 3300, 0, 3.42),
            _run("tst_s6", 2400, 0, 3.35),  # below a noisy (not monotone) ladder: a bound, not "not falling"
            _run("baseline", 1200, 1, 3.61), _run("baseline", 2400, 1, 3.41), _run("baseline", 3300, 1, 3.30),
            _run("tst_s6", 2400, 1, 3.355)]  # halfway (in loss) between 2400 and 3300
    rows = {r["run"].seed: r for r in speedup_rows({r.name: r for r in runs})}
    # 3300 / 2400 = 1.375: a lower bound rounds down, never up
    assert rows[0]["status"] == "below the ladder" and rows[0]["bound"] == "> 1.37x" and rows[0]["n_lin"] is None
    assert rows[1]["status"] == "interpolated"
    assert rows[1]["n_lin"] == pytest.approx(math.exp((math.log(2400) + math.log(3300)) / 2))
    # one seed cut off: no mean over the other alone, each seed's read instead
    (line,) = speedup_summary(list(rows.values()))
    assert "1 of 2 seeds interpolated" in line and "seed 0: below the ladder (> 1.37x)" in line and "±" not in line


def test_speedup_table_never_prints_an_extrapolated_power_law_read():
    """A TST loss below a clean power-law ladder: the fit could be read past its last point,
    but the table gives the bound and "not read", never a number; inside the ladder both reads
    are printed and agree with a hand computation."""
    ladder = {1200: 3.60, 2400: 3.30, 3300: 3.20, 4800: 3.10}
    runs = [_run("baseline", n, 0, y) for n, y in ladder.items()]
    runs += [_run("tst_s6", 2400, 0, 3.05), _run("tst_s6", 2400, 1, 3.15)]
    runs += [_run("baseline", n, 1, y) for n, y in ladder.items()]
    rows = {r["run"].seed: r for r in speedup_rows({r.name: r for r in runs})}
    out, inside = speedup_table_row(rows[0]), speedup_table_row(rows[1])
    assert rows[0]["law_extrapolated"] and "| > 2.00x | outside the ladder | not read |" in out
    assert "below the ladder: -0.0500 ± n/a vs 4800 steps" in out  # the margin the bound rests on
    assert "extrapolated" not in out
    want = math.exp(math.log(3300) + 0.5 * (math.log(4800) - math.log(3300)))  # halfway in loss
    assert f"| {want:.0f} | {want / 2400:.2f}x |" in inside


def test_total_gap_se_and_when_a_speedup_is_not_told_apart_from_one():
    gaps, heldout = [-0.01, 0.02, -0.025], 0.012
    sd = float(np.std(gaps, ddof=1))
    want = math.sqrt(sd**2 / 3 + heldout**2)
    assert total_gap_se(gaps, heldout) == pytest.approx(want)
    assert math.isnan(total_gap_se([0.1], heldout))
    runs = [_run("baseline", 1200, 0, 3.60), _run("baseline", 2400, 0, 3.30), _run("tst_s6", 1200, 0, 3.59)]
    sp = speedup_rows({r.name: r for r in runs})
    gap_row = {"steps": 1200, "gaps": gaps, "total_se": want}
    (line,) = speedup_summary(sp, {1200: gap_row})
    z = np.mean(gaps) / want
    assert f"not told apart from 0 (gap / total SE {z:+.1f})" in line and "from 1.00x" in line
    (clear,) = speedup_summary(sp, {1200: {**gap_row, "gaps": [-0.1, -0.11, -0.09]}})
    assert "told apart" not in clear


def test_a_power_law_at_its_exponent_grid_edge_is_not_read():
    """A ladder that is straight in log(steps) has no power-law optimum inside the searched
    exponents: the fit ends at the grid's edge, and the table says so instead of reading it."""
    ladder = {n: 5.0 - 0.3 * math.log(n) for n in (1200, 2400, 4800, 9600)}
    runs = [_run("baseline", n, 0, y) for n, y in ladder.items()] + [_run("tst_s6", 2400, 0, ladder[2400] - 0.1)]
    (row,) = speedup_rows({r.name: r for r in runs})
    assert row["law"] is not None and row["law"].at_grid_edge and row["n_law"] is None
    assert row["status"] == "interpolated"
    out = speedup_table_row(row)
    assert "| n/a | n/a |" in out and "no fit, not read" in out


def test_seed_mean_ladder_read_against_a_hand_computation():
    """Two seeds with noisy ladders: the mean TST loss is read between the mean ladder's
    two bracketing lengths (log-linear), and the power law is fitted to all 8 baselines."""
    noise = {0: +0.03, 1: -0.03}
    clean = {n: 2.5 + 40.0 * n ** -0.5 for n in (1200, 2400, 3300, 4800)}
    runs = [_run("baseline", n, k, y + noise[k] * (1 if n in (2400, 4800) else -1)) for n, y in clean.items() for k in (0, 1)]
    runs += [_run("tst_s6", 2400, 0, 3.09), _run("tst_s6", 2400, 1, 3.11), _run("tst_s6", 1200, 0, 3.7)]
    (row,) = pooled_speedup_rows({r.name: r for r in runs})  # the 1200-step TST length has 1 seed: no row
    assert row["steps"] == 2400 and row["seeds"] == [0, 1] and row["target"] == pytest.approx(3.10)
    ys = dict(row["ladder"])
    assert ys == pytest.approx(clean)  # the seeds' noise cancels in the mean
    t = (clean[3300] - 3.10) / (clean[3300] - clean[4800])
    want = math.exp(math.log(3300) + t * math.log(4800 / 3300))
    assert row["status"] == "interpolated" and row["n_lin"] == pytest.approx(want)
    assert row["law_points"] == 8 and row["law_rms"] == pytest.approx(0.03, abs=2e-3)
    assert row["law"].c == pytest.approx(0.5, abs=0.01) and row["n_law"] == pytest.approx(((3.10 - 2.5) / 40) ** -2, rel=0.05)
    table = "\n".join(pooled_speedup_lines([row]))
    assert f"| 2400 | 0, 1 | 3.1000 |" in table and f"| {want:.0f} | {want / 2400:.2f}x |" in table


def test_t_interval_against_a_hand_computation():
    vals = [1.57, 1.39, 1.30]
    m, sd = float(np.mean(vals)), float(np.std(vals, ddof=1))
    lo, hi = stats.t_interval(vals)
    assert (lo, hi) == pytest.approx((m - 4.303 * sd / math.sqrt(3), m + 4.303 * sd / math.sqrt(3)))
    assert all(math.isnan(v) for v in stats.t_interval([1.4]))
    # 12 values (11 df, not in the table): the 10-df quantile, a little wide
    assert stats.t_interval([0.0, 1.0] * 6)[1] == pytest.approx(0.5 + 2.228 * np.std([0.0, 1.0] * 6, ddof=1) / math.sqrt(12))
