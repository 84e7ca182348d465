"""The study's report, regenerated from the committed raw results alone.

``build_report`` returns the markdown section of docs/RESULTS.md (between the markers
``<!-- study:begin -->`` and ``<!-- study:end -->``); ``write_plots`` draws its figures.
Every number in it comes from ``docs/results/study/*.json``.

Conventions: a gap is TST - baseline final validation loss at equal steps (equal FLOPs;
below 0 TST wins); "± sd" is over seeds, "(1 seed)" says when there is only one; SE is
the paired standard error of the gap on the shared held-out windows, clustered by source
file (delete-one-file jackknife). Tokens per parameter are the baseline's data tokens
(TST reads 2.5x).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from tst_titan.analysis.fmt import format_number
from tst_titan.analysis.stats import (cluster_jackknife_se, crossover, effective_clusters, fit_power_law,
                                      loglinear_steps, mean_sd, t_interval)
from tst_titan.analysis.study.plan import RunSpec
from tst_titan.analysis.study.results import RunResult

BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"


def fmt(x: float | None, spec: str = ".4f", none: str = "n/a") -> str:
    """A loss-like number to 4 decimals, or ``none`` when it was not measured."""
    return format_number(x, spec, none)


def spread(values: list[float], spec: str = "+.4f", unit: str = "") -> str:
    """'mean ± sd (k seeds)' or 'value (1 seed)'."""
    m, sd = mean_sd(values)
    if len(values) == 1:
        return f"{format(m, spec)}{unit} (1 seed)"
    return f"{format(m, spec)}{unit} ± {format(sd, spec.lstrip('+'))}{unit} ({len(values)} seeds)"


def by_key(results: dict[str, RunResult]) -> dict[tuple[str, str, int], dict[int, RunResult]]:
    """(size, arm, steps) -> {seed: run}."""
    out: dict[tuple[str, str, int], dict[int, RunResult]] = defaultdict(dict)
    for r in results.values():
        out[(r.size, r.arm, r.steps)][r.seed] = r
    return out


def paired_gap(tst: RunResult, base: RunResult, clusters: np.ndarray | None) -> tuple[float, float]:
    """(gap, its paired SE) of two runs on the same held-out windows."""
    return tst.final_loss - base.final_loss, window_gap_se([(tst, base)], clusters)


def window_gap_se(pairs: list[tuple[RunResult, RunResult]], clusters: np.ndarray | None) -> float:
    """Held-out SE of the seed-mean gap: the per-window gaps averaged over the pairs
    (seeds), then a delete-one-file jackknife. The seed-to-seed part is in the seed sd;
    this is what the choice of held-out windows adds (it does not shrink with seeds)."""
    diffs = []
    for tst, base in pairs:
        a, b = tst.sequence_losses, base.sequence_losses
        if clusters is None or a is None or b is None or len(a) != len(b) or len(a) != len(clusters):
            return math.nan
        diffs.append(a - b)
    return cluster_jackknife_se(np.mean(diffs, axis=0), clusters) if diffs else math.nan


def total_gap_se(gaps: list[float], heldout_se: float) -> float:
    """SE of a seed-mean gap from both sources: seed to seed (sd / sqrt(seeds), from that
    length's own seeds: rough with 3) and the choice of held-out windows. NaN with 1 seed."""
    if len(gaps) < 2:
        return math.nan
    return math.sqrt(mean_sd(gaps)[1] ** 2 / len(gaps) + heldout_se**2)


def gap_z(row: dict) -> float:
    """A gap-table row's mean gap over its total SE; NaN without one (1 seed). Below 2 in
    size the gap is not told apart from 0."""
    se = row["total_se"]
    return mean_sd(row["gaps"])[0] / se if se == se and se > 0 else math.nan


def _z(row: dict) -> str:
    """'gap / SE' and whether the gap is told apart from 0."""
    z = gap_z(row)
    return "n/a" if z != z else f"{z:+.1f}" + ("" if abs(z) >= 2 else ": not told apart from 0")


def gap_table(results: dict[str, RunResult], clusters: np.ndarray | None, size: str) -> list[dict]:
    """One row per length with both arms on at least one common seed."""
    keyed = by_key(results)
    rows = []
    for (sz, arm, steps), tst in sorted(keyed.items(), key=lambda kv: kv[0][2]):
        if sz != size or arm != "tst_s6":
            continue
        base = keyed.get((size, "baseline", steps), {})
        seeds = sorted(set(tst) & set(base))
        if not seeds:
            continue
        pairs = [paired_gap(tst[k], base[k], clusters) for k in seeds]
        b0 = base[seeds[0]]
        gaps = [g for g, _ in pairs]
        se = window_gap_se([(tst[k], base[k]) for k in seeds], clusters)
        rows.append(dict(
            steps=steps, seeds=seeds, gaps=gaps, se=se, total_se=total_gap_se(gaps, se),
            base=[base[k].final_loss for k in seeds], tst=[tst[k].final_loss for k in seeds],
            tpp=b0.data_tokens / b0.params, tpp_ne=b0.data_tokens / b0.params_non_embedding,
            tokens_m=b0.data_tokens / 1e6,
        ))
    return rows


def ladder(results: dict[str, RunResult], seed: int, size: str = "study") -> tuple[list[int], list[float]]:
    """(steps, final losses) of the seed's baselines of every length."""
    runs = sorted((r for r in results.values() if r.size == size and r.arm == "baseline" and r.seed == seed),
                  key=lambda r: r.steps)
    return [r.steps for r in runs], [r.final_loss for r in runs]


def _floor2(v: float) -> float:
    """Round a lower bound down to 2 decimals (1.375 -> 1.37: a bound never rounds up)."""
    return math.floor(v * 100 + 1e-9) / 100


def _ceil2(v: float) -> float:
    return math.ceil(v * 100 - 1e-9) / 100


def read_on_ladder(ns: list[int], ys: list[float], target: float, steps: int) -> dict:
    """A loss read on a ladder (2+ lengths): interpolated log-linearly (``n_lin``), or, outside
    it, a bound on the speed-up rounded towards safety and the ladder's ``end`` it rests on."""
    if target < min(ys):  # TST beats every baseline of the ladder: a lower bound only
        return dict(status="below the ladder", bound=f"> {_floor2(max(ns) / steps):.2f}x", n_lin=None, end=max(ns))
    if target > max(ys):
        return dict(status="above the ladder", bound=f"< {_ceil2(min(ns) / steps):.2f}x", n_lin=None, end=min(ns))
    n_lin, _ = loglinear_steps(ns, ys, target)
    return dict(status="interpolated" if n_lin is not None else "ladder not falling", bound=None, n_lin=n_lin,
                end=None)


def speedup_rows(results: dict[str, RunResult], clusters: np.ndarray | None = None,
                 size: str = "study") -> list[dict]:
    """Per TST s = 6 run: the baseline steps at its final loss on the same seed's ladder
    (baselines of at least half the TST run's length), read log-linearly between the two
    lengths that bracket it and, as a check, on a power law fitted to the ladder. A loss
    outside the ladder gets no number, only a bound ("status", rounded towards safety)
    and its margin: TST - the ladder's end it is compared with, with the paired SE."""
    rows = []
    for r in sorted(results.values(), key=lambda r: (r.steps, r.seed)):
        if r.size != size or r.arm != "tst_s6":
            continue
        runs = {b.steps: b for b in results.values()
                if b.size == size and b.arm == "baseline" and b.seed == r.seed and b.steps >= r.steps / 2}
        near = sorted((n, b.final_loss) for n, b in runs.items())
        ns, ys = [n for n, _ in near], [y for _, y in near]
        row = dict(run=r, ladder=near, n_lin=None, law=None, n_law=None, law_extrapolated=False,
                   speed_lin=None, speed_law=None, bound=None, margin=None)
        if len(near) < 2:
            row["status"] = "ladder incomplete"
            rows.append(row)
            continue
        read = read_on_ladder(ns, ys, r.final_loss, r.steps)
        end = read.pop("end")
        row.update(read, speed_lin=None if read["n_lin"] is None else read["n_lin"] / r.steps)
        if end is not None:
            row["margin"] = (end, *paired_gap(r, runs[end], clusters))
        law = fit_power_law(ns, ys)
        # an exponent at the searched range's edge is no optimum: its curve is not read
        n_law = law.steps_at(r.final_loss) if law is not None and not law.at_grid_edge else None
        row.update(law=law, n_law=n_law, speed_law=None if n_law is None else n_law / r.steps,
                   law_extrapolated=n_law is not None and not min(ns) <= n_law <= max(ns))
        rows.append(row)
    return rows


def pooled_speedup_rows(results: dict[str, RunResult], size: str = "study") -> list[dict]:
    """Per TST s = 6 length with 2 or more seeds: the seed-mean final loss read on the
    seed-mean ladder (the lengths >= half the TST run's where every one of those seeds has
    its baseline), log-linearly, and on one power law fitted to all of those baselines
    together (more points than parameters: its residuals are a check). One seed's ladder
    carries that seed's data order at every length; averaging seeds first reads the TST
    loss on a smoother ladder than any one seed's."""
    keyed = by_key(results)
    rows = []
    for (sz, arm, steps), tst in sorted(keyed.items(), key=lambda kv: kv[0][2]):
        if sz != size or arm != "tst_s6" or len(tst) < 2:
            continue
        seeds = sorted(tst)
        lengths = sorted(n for (z, a, n), base in keyed.items()
                         if z == size and a == "baseline" and n >= steps / 2 and set(seeds) <= set(base))
        target = float(np.mean([tst[k].final_loss for k in seeds]))
        ys = [float(np.mean([keyed[(size, "baseline", n)][k].final_loss for k in seeds])) for n in lengths]
        row = dict(steps=steps, seeds=seeds, target=target, ladder=list(zip(lengths, ys)), n_lin=None,
                   bound=None, n_law=None, law=None, status="ladder incomplete")
        if len(lengths) >= 2:
            read = read_on_ladder(lengths, ys, target, steps)
            read.pop("end")
            row.update(read)
        pts = [(n, keyed[(size, "baseline", n)][k].final_loss) for n in lengths for k in seeds]
        law = fit_power_law([n for n, _ in pts], [y for _, y in pts]) if len(lengths) >= 3 else None
        if law is not None:
            n_law = law.steps_at(target) if not law.at_grid_edge else None
            inside = n_law is not None and min(lengths) <= n_law <= max(lengths)
            rms = float(np.sqrt(np.mean([(y - law.loss(n)) ** 2 for n, y in pts])))
            row.update(law=law, n_law=n_law if inside else None, law_outside=n_law is not None and not inside,
                       law_rms=rms, law_points=len(pts))
        rows.append(row)
    return rows


def pooled_speedup_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    out = ["", "On the seed-mean ladder (the mean TST loss of a length read on the mean of the same seeds' "
           "baselines; the power law fitted to all of those baselines at once):", "",
           "| TST steps | seeds | mean TST loss | mean ladder (steps: loss) | log-linear: baseline steps | speed-up "
           "| power law (all seeds' baselines): steps | speed-up | its residuals (rms, points) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ladder = ", ".join(f"{n}: {y:.4f}" for n, y in row["ladder"]) or "none yet"
        if row["status"] == "interpolated":
            lin = f"{row['n_lin']:.0f} | {row['n_lin'] / row['steps']:.2f}x"
        else:
            lin = f"{row['status']} | {row['bound'] or 'n/a'}"
        law = row["law"]
        if law is None:
            law_cells, resid = "n/a | n/a", "n/a (< 3 lengths)"
        else:
            if law.at_grid_edge:
                law_cells = f"no fit (c = {law.c:.2f}, the searched range's edge) | n/a"
            elif row["n_law"] is not None:
                law_cells = f"{row['n_law']:.0f} | {row['n_law'] / row['steps']:.2f}x"
            else:
                law_cells = ("outside the ladder | not read" if row.get("law_outside") else "n/a | n/a")
            resid = f"{row['law_rms']:.4f} ({row['law_points']} points, 3 parameters)"
        out.append(f"| {row['steps']} | {', '.join(map(str, row['seeds']))} | {row['target']:.4f} | {ladder} "
                   f"| {lin} | {law_cells} | {resid} |")
    return out


def speedup_table_row(row: dict) -> str:
    """One markdown row of the speed-up table: the log-linear read or its bound (with the
    margin it rests on), the power-law check (only inside the ladder: a power law read past
    its points is a guess), its residuals."""
    r, law = row["run"], row["law"]
    if law is None:
        resid = "n/a (< 3 points)"
    else:
        resid = ", ".join(f"{round(y - law.loss(n), 4) + 0.0:+.4f}" for n, y in row["ladder"])  # no "-0.0000"
        if law.n_points == 3:
            resid += " (3 points, 3 parameters: not a check)"
        if law.at_grid_edge:
            resid += f"; exponent at the searched range's edge (c = {law.c:.2f}): no fit, not read"
    if row["status"] == "interpolated":
        lin = f"{row['n_lin']:.0f} | {row['speed_lin']:.2f}x"
    else:
        status = row["status"]
        if row["margin"] is not None:
            end, g, se = row["margin"]
            status += f": {g:+.4f} ± {fmt(se)} vs {end} steps"
        lin = f"{status} | {row['bound'] or 'n/a'}"
    if row["n_law"] is None:
        law_cells = "n/a | n/a"
    elif row["law_extrapolated"]:
        law_cells = "outside the ladder | not read"
    else:
        law_cells = f"{row['n_law']:.0f} | {row['speed_law']:.2f}x"
    ladder_cell = ", ".join(f"{n}: {y:.4f}" for n, y in row["ladder"]) or "none yet"
    return f"| {r.name} | {r.final_loss:.4f} | {ladder_cell} | {lin} | {law_cells} | {resid} |"


def speedup_summary(sp: list[dict], gaps: dict[int, dict] | None = None) -> list[str]:
    """One line per TST length: mean ± sd when every seed's read is interpolated; else
    each seed's read or bound (a mean over the interpolated seeds alone would be biased).
    With the gap table's rows (``gaps``: steps -> row), a length whose equal-length gap is
    not told apart from 0 says that its speed-up is not told apart from 1.00x either."""
    lines = []
    for steps in sorted({row["run"].steps for row in sp}):
        rows = [row for row in sp if row["run"].steps == steps]
        good = [row["speed_lin"] for row in rows if row["status"] == "interpolated"]
        if good and len(good) == len(rows):
            line = (f"- TST at {steps} steps: equal-loss speed-up {spread(good, '.2f', 'x')} "
                    "(log-linear, interpolated)")
            if len(good) > 1:
                lo, hi = t_interval(good)
                line += f"; 95% interval of the mean {lo:.2f}x to {hi:.2f}x (Student t, {len(good) - 1} df)"
        else:
            per_seed = [f"seed {row['run'].seed}: " + (f"{row['speed_lin']:.2f}x" if row["status"] == "interpolated"
                        else row["status"] + (f" ({row['bound']})" if row["bound"] else "")) for row in rows]
            line = f"- TST at {steps} steps: {len(good)} of {len(rows)} seeds interpolated; " + "; ".join(per_seed)
        g = (gaps or {}).get(steps)
        z = gap_z(g) if g is not None else math.nan
        if abs(z) < 2:  # False for NaN
            line += (f"; the equal-length gap is not told apart from 0 (gap / total SE {z:+.1f}), "
                     "so neither is the speed-up from 1.00x")
        lines.append(line + ".")
    return lines


def shared_with(results: dict[str, RunResult]) -> dict[str, list[str]]:
    """The runs that ran at the same time as each run for at least a quarter of it."""
    out = {}
    for n, r in results.items():
        need = 0.25 * sum(e - s for s, e in r.spans)
        out[n] = sorted(m for m, o in results.items() if m != n and sum(
            max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in r.spans for s2, e2 in o.spans) >= need)
    return out


def build_report(results: dict[str, RunResult], clusters: np.ndarray | None, plan: list[RunSpec],
                 command: str, source: str = "docs/results/study/") -> str:
    """The markdown section (markers included)."""
    out = [BEGIN, f"_Generated by `{command}` from {len(results)} raw results in {source}; "
           "do not edit by hand._", ""]
    missing = [s.name for s in plan if s.name not in results]
    any_run = next(iter(results.values()), None)
    if any_run is not None:
        machines = sorted({r.raw["machine"] for r in results.values()})
        commits = sorted({r.raw["commit"] for r in results.values()})
        vs = any_run.raw.get("val_store") or {}
        out += [
            f"- Machine(s): {'; '.join(machines)}; commits of the runs: {', '.join(commits)}.",
            f"- Held-out set: `{vs.get('path')}` ({fmt(vs.get('num_tokens'), ',', '?')} tokens); "
            f"{len(any_run.sequence_losses) if any_run.sequence_losses is not None else '?'} windows of 256 "
            f"tokens from {len(set(clusters.tolist())) if clusters is not None else '?'} source files "
            f"(as unequal as {effective_clusters(clusters) if clusters is not None else math.nan:.1f} equal ones): "
            "standard errors are delete-one-file jackknifes.",
        ]
    out.append(f"- Finished: {len(results)} of {len(plan)} planned runs."
               + (f" Not yet run: {len(missing)} (continue with `python scripts/bench_quality.py --jobs 2`)."
                  if missing else ""))
    gap_rows = {size: gap_table(results, clusters, size) for size in ("study", "small")}
    for size, rows in gap_rows.items():
        if not rows:
            continue
        r0 = next(r for r in results.values() if r.size == size)
        out += ["", f"### Equal-FLOPs gap against length: `{r0.raw['flavor']}` ({r0.params:,} parameters, "
                f"{r0.params_non_embedding:,} non-embedding)", "",
                "| steps | baseline tokens / param (total, non-emb.) | baseline loss | TST s=6 loss "
                "| gap TST − baseline (± sd over seeds) | held-out SE of the mean gap "
                "| total SE (seeds and held-out) | gap / total SE |", "|---|---|---|---|---|---|---|---|"]
        for row in rows:
            out.append(f"| {row['steps']} | {row['tpp']:.2f}, {row['tpp_ne']:.2f} | {spread(row['base'], '.4f')} "
                       f"| {spread(row['tst'], '.4f')} | {spread(row['gaps'])} | {fmt(row['se'])} "
                       f"| {fmt(row['total_se'])} | {_z(row)} |")
        out += crossover_lines(rows)
    sp = speedup_rows(results, clusters)
    if sp:
        out += ["", "### Equal-loss speed-up, interpolated on annealed baselines", "",
                "Each TST run's final loss is read on its own seed's baseline ladder (every baseline of "
                "at least half the TST run's length, each trained and annealed for its own length). "
                "Log-linear: piecewise linear in log(steps) between the two lengths that bracket the loss "
                "(the primary read: local; it assumes a straight line in log(steps) between them, so where "
                "the ladder bends it misreads by the bend: too many baseline steps where it is convex in log(steps), "
                "a power law's shape, too few where it is concave). Power law: L(n) = a + b n^-c fitted "
                "to the same points (3 or more), as a check (with 3 points it has no freedom left: its residuals are no check; a best exponent at the edge of the searched range, 0.05 to 2, means no power law fits: the ladder is straight or concave in log(steps) there, and it is not read). Speed-up = baseline steps / TST steps "
                "(= FLOPs ratio: equal FLOPs per step). A loss outside its ladder gets no number, only a "
                "bound (the longest or shortest baseline over the TST steps, rounded towards safety; beside it "
                "TST − that baseline ± its paired held-out SE): nothing is extrapolated from either read.", "",
                "| TST run | its final loss | ladder (steps: loss) | log-linear: baseline steps | speed-up "
                "| power law: steps | speed-up | fit residuals |", "|---|---|---|---|---|---|---|---|"]
        out += [speedup_table_row(row) for row in sp]
        out += [""] + speedup_summary(sp, {g["steps"]: g for g in gap_rows["study"]})
        out += pooled_speedup_lines(pooled_speedup_rows(results))
    out += ablation_lines(results, clusters)
    out += run_table(results, clusters)
    out += ["", "Figures: `docs/img/study_gap.png` (gap against tokens per non-embedding parameter, both "
            "sizes), `docs/img/study_ladder.png` (baseline ladders, power-law fits and the TST runs).", END]
    return "\n".join(out) + "\n"


def _tpp(v: float) -> str:
    """Tokens per parameter to 2 significant figures (the data support no more)."""
    return f"{v:#.2g}".rstrip(".") if v < 100 else f"{v:.0f}"  # 2.0, 0.22, 12


def _where(v: float) -> str:
    """A crossover position, or which side of the measured range it lies on."""
    if v == -math.inf:
        return "below the measured range"
    if v == math.inf:
        return "above the measured range"
    if math.isnan(v):
        return "none (the gap only rises through 0)"
    return _tpp(v)


def crossover_lines(rows: list[dict]) -> list[str]:
    """The crossover in tokens per total and per non-embedding parameter, with its interval."""
    if len(rows) < 2:
        return []
    lines = [""]
    c = None
    for key, label in (("tpp", "tokens per total parameter"), ("tpp_ne", "tokens per non-embedding parameter"),
                       ("tokens_m", "data tokens (millions; the same batch at both sizes, so also steps)")):
        c = crossover([r[key] for r in rows], [r["gaps"] for r in rows], [r["se"] for r in rows])
        if c.df == 0:
            interval = "no interval yet: no length has 2 seeds"
        elif math.isinf(c.estimate) and c.lo == c.hi == c.estimate:
            interval = "so in at least 97.5% of the simulated draws"
        else:
            interval = f"95% interval {_where(c.lo)} to {_where(c.hi)}"
        where = _where(c.estimate)
        if c.bracket is not None:
            lo, hi = c.bracket
            where = (f"between the measured {_tpp(lo)} and {_tpp(hi)}; {_where(c.estimate)} on a line in "
                     "log tokens between them")
        lines.append(f"- Crossover (gap = 0), baseline {label}: {where} ({interval}).")
    if c is not None and c.df:
        note = (f"- The interval simulates the mean gap at each length from the seed sd pooled over lengths "
                f"({c.seed_sd:.4f}, {c.df} degrees of freedom, over the root of that length's seeds) plus its "
                "held-out SE, and reads each draw on the same straight lines in log tokens: it is conditional on the gap "
                "being straight in log tokens between the measured lengths, and it draws the held-out errors of "
                "different lengths independently, though they are measured on the same windows")
        if any(len(r["gaps"]) == 1 for r in rows):
            note += "; a length with 1 seed borrows the pooled sd"
        sds = [mean_sd(r["gaps"])[1] for r in rows if len(r["gaps"]) > 1]
        if len(sds) > 1 and max(sds) > 2 * min(sds):
            note += (f"; the seed sd differs between lengths ({min(sds):.3f} to {max(sds):.3f}), so pooling "
                     "widens the interval where it is small (conservative)")
        if c.no_crossing_share > 0.025:
            note += f"; in {100 * c.no_crossing_share:.0f}% of the draws the gap only rises through 0"
        lines.append(note + ".")
    return lines


def ablation_lines(results: dict[str, RunResult], clusters: np.ndarray | None) -> list[str]:
    """Each ablation against the same seed's baseline and full TST (s = 6), and that
    difference in units of the seed sd of a paired gap at the same length (the sd over
    seeds of TST s=6 - baseline): about 1 or less is within seed noise."""
    abl = [r for r in results.values() if r.group == "ablation"]
    if not abl:
        return []
    keyed = by_key(results)
    lines = ["", "### Ablations (1200 steps, seed 0: one run each)", "",
             "In seed sds: the difference over the sd across seeds of a paired TST s=6 − baseline gap at the "
             "same length, the noise one seed carries (the paired SE is the held-out part only).", "",
             "| run | final loss | − baseline (same seed), paired SE | − TST s=6 (same seed), paired SE "
             "| in seed sds: − baseline, − TST s=6 |", "|---|---|---|---|---|"]
    for r in sorted(abl, key=lambda r: r.name):
        base = keyed.get(("study", "baseline", r.steps), {})
        tst = keyed.get(("study", "tst_s6", r.steps), {})
        gaps = [tst[k].final_loss - base[k].final_loss for k in sorted(set(tst) & set(base))]
        sd = mean_sd(gaps)[1] if len(gaps) > 1 else math.nan
        cells = []
        for other in (base.get(r.seed), tst.get(r.seed)):
            if other is None:
                cells.append("not run")
            else:
                g, se = paired_gap(r, other, clusters)
                cells.append(f"{g:+.4f} ± {fmt(se)}")
        units = ", ".join("n/a" if o is None else f"{(r.final_loss - o.final_loss) / sd:+.1f}"
                          for o in (base.get(r.seed), tst.get(r.seed)))
        units = f"{units} (sd {sd:.4f}, {len(gaps)} seeds)" if sd == sd else "n/a (needs 2 seeds of the pair)"
        lines.append(f"| {r.name} | {r.final_loss:.4f} | {cells[0]} | {cells[1]} | {units} |")
    return lines


def run_table(results: dict[str, RunResult], clusters: np.ndarray | None) -> list[str]:
    share = shared_with(results)
    lines = ["", "<details><summary>Every run</summary>", "",
             "| run | final loss ± SE (jackknife by file; i.i.d.) | data tokens | job time | load average at start, end "
             "| commit | shared the 2 cores with (study runs) |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(results.values(), key=lambda r: (r.size, r.steps, r.arm, r.seed)):
        iid = r.raw["val"][-1][2]
        lines.append(f"| {r.name} | {r.final_loss:.4f} ± {fmt(r.se(clusters))}; {fmt(iid)} | {int(r.data_tokens):,} "
                     f"| {r.wall_seconds / 60:.1f} min | {_loads(r)} | {r.raw['commit']} | {', '.join(share[r.name]) or '-'} |")
    return lines + ["", "</details>"]


def _loads(r: RunResult) -> str:
    """The machine's 1-minute load average when each attempt started and ended (2 cores:
    above 2 means the run shared its core with more than the study)."""
    return "; ".join(f"{a.get('load_start', math.nan):.1f}, {fmt(a.get('load_end'), '.1f')}"
                     for a in r.raw["attempts"])


def replace_section(document: str, section: str) -> str:
    """``document`` with the text between the study markers replaced by ``section``."""
    if BEGIN not in document or END not in document:
        raise ValueError(f"no {BEGIN} ... {END} markers")
    head, rest = document.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + section.rstrip("\n") + tail


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Log x axis, labels, grid and legend; the figure saved to ``path``."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.4, not 4x10^-1
    # minor ticks: label 2, 3 and 5 of each decade only (all of them overlap)
    ax.xaxis.set_minor_formatter(FuncFormatter(
        lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "235" else ""))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.margins(x=0.12)  # room for the point labels
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def write_plots(results: dict[str, RunResult], clusters: np.ndarray | None, out_dir: Path) -> list[Path]:
    """study_gap.png and study_ladder.png (what exists of them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, size in enumerate(("study", "small")):
        rows = gap_table(results, clusters, size)
        if not rows:
            continue
        xs = [r["tpp_ne"] for r in rows]
        means = [mean_sd(r["gaps"])[0] for r in rows]
        errs = [mean_sd(r["gaps"])[1] if len(r["gaps"]) > 1 else r["se"] for r in rows]
        r0 = next(r for r in results.values() if r.size == size)
        ax.errorbar(xs, means, yerr=[0 if math.isnan(e) else e for e in errs], marker="o", capsize=4,
                    color=f"C{i}", label=f"{r0.raw['flavor']} ({r0.params_non_embedding:,} non-emb. params)")
        for r, x, m in zip(rows, xs, means):
            note = f"{r['steps']} steps" + (" (1 seed: SE)" if len(r["gaps"]) == 1 else f" ({len(r['gaps'])} seeds)")
            ax.annotate(note, (x, m), textcoords="offset points", xytext=(5, 5), fontsize=7, color=f"C{i}")
    if ax.lines:
        ax.axhline(0, color="gray", linestyle=":")
        written.append(_save(fig, ax, out_dir / "study_gap.png",
                             "baseline data tokens per non-embedding parameter (TST reads 2.5x)",
                             "final val loss: TST − baseline (nats)",
                             "Equal-FLOPs gap (below 0: TST wins); bars: sd over seeds"))
    plt.close(fig)
    sp = speedup_rows(results)
    seeds = sorted({r.seed for r in results.values() if r.size == "study" and r.arm == "baseline"})
    if seeds:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for k in seeds:  # the ladder region only: the short sweep runs would squash it
            pts = [(n, y) for n, y in zip(*ladder(results, k)) if n >= 600]
            if not pts:
                continue
            steps, losses = [n for n, _ in pts], [y for _, y in pts]
            ax.plot(steps, losses, "o", color=f"C{k}", label=f"baselines, seed {k}")
            fit = [(n, y) for n, y in pts if n >= 1200]  # the ladder the 2400-step TST runs are read on
            law = fit_power_law([n for n, _ in fit], [y for _, y in fit])
            if law is not None and not law.at_grid_edge:
                grid = np.geomspace(min(n for n, _ in fit), max(steps), 100)
                ax.plot(grid, law.loss(grid), "-", color=f"C{k}", alpha=0.5)
        for row in sp:
            r = row["run"]
            if r.steps < 1200:
                continue
            ax.plot([r.steps], [r.final_loss], "*", markersize=11, color=f"C{r.seed}")
            if row["n_lin"] is not None:
                ax.plot([r.steps, row["n_lin"]], [r.final_loss, r.final_loss], ":", color=f"C{r.seed}")
        written.append(_save(fig, ax, out_dir / "study_ladder.png",
                             "steps (each baseline annealed at its own length)", "final val loss",
                             "Baselines (o; line: power law over >= 1200 steps), TST (*); dotted: equal-loss read"))
        plt.close(fig)
    return written
