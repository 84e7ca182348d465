#!/usr/bin/env python
"""Compare a baseline run with TST runs from their TensorBoard event files.

    python scripts/compare_runs.py outputs/debug_cpu outputs/tst_debug_cpu [--out comparison]

Each RUN_DIR is a job's dump folder (or any folder holding its ``events.out.tfevents.*``
files; the event files of a resumed run are merged, later files winning). Writes
``<out>/compare.png``: next-token validation loss against steps, data tokens, wall-clock
and training FLOPs, the switch of each TST run marked; and ``<out>/compare.md``: each run's
final validation loss and the **equal-loss speed-up**: the steps, wall-clock and FLOPs the
baseline needed for its final validation loss, divided by what the run needed to first
reach it (linear interpolation between validation points).

That in-run read compares points of one learning-rate schedule: with a decay at the end
(WSD, cosine) no mid-run point is annealed, and the read understates a run whose gain
shows in its final loss. Give **two or more baselines trained for different numbers of
steps** and ``compare.md`` adds the annealed read: the steps a baseline trained for that
long would need to reach each TST run's final loss, interpolated log-linearly in steps
between the baselines' final losses (extrapolated past them, and marked so).

The baseline is the first run without a superposition phase, or ``--baseline``. Wall-clock
is the sum over event files of the time from each file's first to its last logged step
(start-up and time between restarts are excluded). FLOPs come from ``tst/train_flops``
(torchtitan's per-token training FLOPs x model positions), logged by tst_titan's trainer.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

VAL = "validation_metrics/loss"
DATA_TOKENS = "n_tokens_seen"
FLOPS = "tst/train_flops"
PHASE = "tst/phase"
BAG = "tst/bag_size"
SWITCH = "tst/switch_step"
REQUIRED = (VAL, DATA_TOKENS, FLOPS)


class RunError(ValueError):
    """A run folder that cannot be compared (no events, or a needed tag missing)."""


@dataclass
class Series:
    steps: np.ndarray
    values: np.ndarray


@dataclass
class Run:
    name: str
    val: Series  # validation loss at validation steps
    data_tokens: Series  # cumulative, at log steps
    flops: Series  # cumulative, at log steps
    wall: Series  # seconds since the first logged step, at log steps
    switch_step: int | None = None  # last superposition step, None for a plain run
    bag_size: int = 1
    members: list[str] = field(default_factory=list)  # for averaged runs

    @property
    def final_step(self) -> int:
        return int(self.val.steps[-1])

    @property
    def final_loss(self) -> float:
        return float(self.val.values[-1])

    def at(self, series: Series, step: float) -> float:
        """A cumulative quantity at a (fractional) step, linearly interpolated; 0 at step 0."""
        xs = np.concatenate([[0.0], series.steps.astype(float)])
        ys = np.concatenate([[0.0], series.values.astype(float)])
        return float(np.interp(step, xs, ys))


def _event_files(run_dir: Path) -> list[Path]:
    files = sorted(run_dir.rglob("events.out.tfevents.*"), key=lambda p: (p.parent.name, p.name))
    if not files:
        raise RunError(f"{run_dir}: no TensorBoard event files (was metrics.enable_tensorboard on?)")
    return files


def _read_scalars(run_dir: Path) -> tuple[dict[str, dict[int, float]], dict[int, float]]:
    """All scalars of a run, ``tag -> {step: value}``, and the wall-clock of each step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    wall: dict[int, float] = {}
    offset = 0.0
    for f in _event_files(run_dir):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags().get("scalars", [])
        if not tags:
            continue
        for tag in tags:
            for ev in acc.Scalars(tag):
                scalars.setdefault(tag, {})[ev.step] = ev.value
        if DATA_TOKENS in tags:
            events = acc.Scalars(DATA_TOKENS)
            t0 = events[0].wall_time
            for ev in events:
                wall[ev.step] = offset + ev.wall_time - t0
            offset = wall[events[-1].step]
    return scalars, wall


def _series(d: dict[int, float]) -> Series:
    steps = np.array(sorted(d), dtype=np.int64)
    return Series(steps, np.array([d[s] for s in steps], dtype=np.float64))


def load_run(run_dir: str | Path, name: str | None = None) -> Run:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: not a folder")
    scalars, wall = _read_scalars(run_dir)
    missing = [t for t in REQUIRED if t not in scalars]
    if missing:
        hint = {
            VAL: "enable [validation] in the run's config",
            DATA_TOKENS: "log with torchtitan's MetricsProcessor",
            FLOPS: "train with `-m tst_titan.train` (tst.enable = false for a baseline)",
        }
        raise RunError(
            f"{run_dir}: missing TensorBoard tag(s) "
            + ", ".join(f"'{t}' ({hint[t]})" for t in missing)
        )
    switch, bag = None, 1
    p1 = [s for s, v in scalars.get(PHASE, {}).items() if v == 1]
    logged_switch = int(max(scalars.get(SWITCH, {0: 0}).values()))
    if p1 or logged_switch > 0:
        switch = logged_switch or max(p1)  # the logged plan; else the last logged phase-1 step
        bag = int(max(scalars.get(BAG, {1: 1}).values()))
    return Run(
        name=name or run_dir.name,
        val=_series(scalars[VAL]),
        data_tokens=_series(scalars[DATA_TOKENS]),
        flops=_series(scalars[FLOPS]),
        wall=_series(wall),
        switch_step=switch,
        bag_size=bag,
    )


def average_runs(runs: list[Run], name: str) -> Run:
    """Mean of runs that share a config (e.g. seeds): losses and x-axes at common steps."""
    def mean(get) -> Series:
        common = sorted(set.intersection(*(set(get(r).steps.tolist()) for r in runs)))
        vals = [np.array([dict(zip(get(r).steps.tolist(), get(r).values))[s] for s in common]) for r in runs]
        return Series(np.array(common, dtype=np.int64), np.mean(vals, axis=0))

    return Run(
        name=name,
        val=mean(lambda r: r.val),
        data_tokens=mean(lambda r: r.data_tokens),
        flops=mean(lambda r: r.flops),
        wall=mean(lambda r: r.wall),
        switch_step=runs[0].switch_step,
        bag_size=runs[0].bag_size,
        members=[r.name for r in runs],
    )


def first_step_reaching(run: Run, target: float) -> float | None:
    """The (fractional) step at which the run's validation loss first reaches ``target``."""
    steps, loss = run.val.steps.astype(float), run.val.values
    hits = np.nonzero(loss <= target)[0]
    if len(hits) == 0:
        return None
    i = int(hits[0])
    if i == 0:
        return steps[0]
    x0, x1, y0, y1 = steps[i - 1], steps[i], loss[i - 1], loss[i]
    return x0 + (x1 - x0) * (y0 - target) / (y0 - y1)


@dataclass
class SpeedUp:
    step: float | None  # step at which the run reached the baseline's final loss
    steps: float | None  # baseline steps / run steps (to that loss)
    wall: float | None
    flops: float | None


def equal_loss_speedup(baseline: Run, run: Run) -> SpeedUp:
    target = baseline.final_loss
    step = first_step_reaching(run, target)
    if step is None:
        return SpeedUp(None, None, None, None)
    b = baseline.final_step

    def ratio(series_of) -> float | None:
        mine = run.at(series_of(run), step)
        return baseline.at(series_of(baseline), b) / mine if mine > 0 else None

    return SpeedUp(step, b / step, ratio(lambda r: r.wall), ratio(lambda r: r.flops))


@dataclass
class AnnealedSpeedUp:
    baseline_steps: float | None  # steps of a baseline trained to reach the run's final loss
    steps: float | None  # baseline_steps / the run's steps
    flops: float | None  # the same in training FLOPs (baseline FLOPs per step from its nearest run)
    extrapolated: bool  # the loss lies outside the baselines' final losses


def annealed_ends(baselines: list[Run]) -> list[Run]:
    """The baselines the annealed read uses, by length (of two with the same length, the later given)."""
    return sorted({b.final_step: b for b in baselines}.values(), key=lambda b: b.final_step)


def annealed_speedup(baselines: list[Run], run: Run) -> AnnealedSpeedUp:
    """Equal-loss speed-up on annealed endpoints: final loss of each baseline against log(steps),
    piecewise linear, read at ``run``'s final loss (the two nearest endpoints outside the range)."""
    ends = annealed_ends(baselines)
    if len(ends) < 2:
        raise RunError("the annealed read needs baselines of at least 2 different lengths")
    target = run.final_loss
    pairs = list(zip(ends, ends[1:]))
    inside = [(a, b) for a, b in pairs if min(a.final_loss, b.final_loss) <= target <= max(a.final_loss, b.final_loss)]
    if inside:
        a, b = inside[0]
    else:  # extrapolate from the end nearer the target
        a, b = pairs[-1] if target < min(e.final_loss for e in ends) else pairs[0]
    if a.final_loss <= b.final_loss:  # a longer baseline that is not better: no slope to read
        return AnnealedSpeedUp(None, None, None, not inside)
    la, lb = np.log(a.final_step), np.log(b.final_step)
    t = (a.final_loss - target) / (a.final_loss - b.final_loss)
    steps = float(np.exp(la + t * (lb - la)))
    near = min(ends, key=lambda e: abs(np.log(e.final_step) - np.log(steps)))
    flops_per_step = near.at(near.flops, near.final_step) / near.final_step
    mine = run.at(run.flops, run.final_step)
    return AnnealedSpeedUp(steps, steps / run.final_step,
                           steps * flops_per_step / mine if mine > 0 else None, not inside)


def annealed_table(runs: list[Run]) -> str:
    """Rows for the TST runs against the baselines' annealed endpoints ('' if fewer than 2 lengths)."""
    ends = annealed_ends([r for r in runs if r.switch_step is None])
    if len(ends) < 2:
        return ""
    lines = [
        "Against annealed baselines (each trained for its own length; final losses "
        + ", ".join(f"{b.final_loss:.4f} at {b.final_step}" for b in ends)
        + "), log-linear in steps:",
        "",
        "| run | final step | final val loss | baseline steps to that loss | speed-up: steps | FLOPs |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        if r.switch_step is None:
            continue
        su = annealed_speedup(ends, r)
        mark = " (extrapolated)" if su.extrapolated and su.baseline_steps is not None else ""
        lines.append(f"| {r.name} | {r.final_step} | {r.final_loss:.4f} "
                     f"| {_fmt(su.baseline_steps, '.0f', 'no slope')}{mark} | {_x(su.steps)} | {_x(su.flops)} |")
    return "\n".join(lines) + "\n"


def pick_baseline(runs: list[Run], name: str | None) -> Run:
    if name is not None:
        for r in runs:
            if r.name == name:
                return r
        raise RunError(f"--baseline {name}: not among the runs ({', '.join(r.name for r in runs)})")
    for r in runs:
        if r.switch_step is None:
            return r
    return runs[0]


def _fmt(x: float | None, spec: str, none: str = "not reached") -> str:
    return none if x is None else format(x, spec)


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def markdown_table(runs: list[Run], baseline: Run, spread: dict[str, float] | None = None) -> str:
    """One row per run: final validation loss and the equal-loss speed-up over the baseline."""
    spread = spread or {}
    lines = [
        f"Baseline: **{baseline.name}**, final validation loss {baseline.final_loss:.4f} "
        f"at step {baseline.final_step}.",
        "",
        "| run | TST | final step | final val loss | step reaching baseline loss "
        "| speed-up: steps | wall-clock | FLOPs | data tokens read |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        tst = "off" if r.switch_step is None else f"s={r.bag_size}, switch after {r.switch_step}"
        loss = f"{r.final_loss:.4f}"
        if r.name in spread:
            loss += f" ± {spread[r.name]:.4f}"
        if r is baseline:
            su = SpeedUp(float(r.final_step), 1.0, 1.0, 1.0)
        else:
            su = equal_loss_speedup(baseline, r)
        lines.append(
            f"| {r.name} | {tst} | {r.final_step} | {loss} | {_fmt(su.step, '.0f')} "
            f"| {_x(su.steps)} | {_x(su.wall)} | {_x(su.flops)} | {int(r.at(r.data_tokens, r.final_step)):,} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], baseline: Run, out_png: Path, title: str = "") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RunError("the PNG needs matplotlib: pip install matplotlib (or tst-titan[report])") from e

    axes_spec = [
        ("step", lambda r, s: s.astype(float)),
        ("data tokens", lambda r, s: np.array([r.at(r.data_tokens, x) for x in s])),
        ("wall-clock (s)", lambda r, s: np.array([r.at(r.wall, x) for x in s])),
        ("training FLOPs", lambda r, s: np.array([r.at(r.flops, x) for x in s])),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for ax, (label, xs_of) in zip(axes.flat, axes_spec):
        for i, r in enumerate(runs):
            color = f"C{i}"
            ax.plot(xs_of(r, r.val.steps), r.val.values, marker=".", color=color, label=r.name)
            if r.switch_step is not None:
                sx = xs_of(r, np.array([r.switch_step]))[0]
                ax.axvline(sx, color=color, linestyle="--", linewidth=0.8)
        ax.axhline(baseline.final_loss, color="gray", linestyle=":", linewidth=0.8)
        ax.set_xlabel(label)
        ax.set_ylabel("next-token validation loss")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(
        (title + "\n" if title else "")
        + "dashed: switch to next-token training; dotted: baseline's final loss"
    )
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR")
    ap.add_argument("--names", nargs="*", help="display names, one per RUN_DIR")
    ap.add_argument("--baseline", help="name of the baseline run (default: first run without TST)")
    ap.add_argument("--out", default="comparison", help="output folder (compare.png, compare.md)")
    args = ap.parse_args(argv)
    if args.names and len(args.names) != len(args.runs):
        ap.error("--names needs one name per RUN_DIR")
    try:
        names = args.names or [None] * len(args.runs)
        runs = [load_run(d, n) for d, n in zip(args.runs, names)]
        baseline = pick_baseline(runs, args.baseline)
        table = markdown_table(runs, baseline)
        annealed = annealed_table(runs)
        if annealed:
            table += "\n" + annealed
        out = Path(args.out)
        plot(runs, baseline, out / "compare.png")
    except RunError as e:
        print(f"compare_runs: error: {e}", file=sys.stderr)
        return 2
    (out / "compare.md").write_text(table)
    print(table)
    print(f"wrote {out / 'compare.png'} and {out / 'compare.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
