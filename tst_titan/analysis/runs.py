"""A training run as the analysis sees it: validation loss, data tokens, FLOPs and
wall-clock against steps, read from a dump folder's TensorBoard event files.

Used by ``scripts/compare_runs.py`` and the quality study (:mod:`tst_titan.analysis.study`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tst_titan.errors import RunError

VAL = "validation_metrics/loss"
DATA_TOKENS = "n_tokens_seen"
FLOPS = "tst/train_flops"
PHASE = "tst/phase"
BAG = "tst/bag_size"
SWITCH = "tst/switch_step"
REQUIRED = (VAL, DATA_TOKENS, FLOPS)


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
