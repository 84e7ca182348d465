"""Equal-loss speed-ups: the in-run read (first step at which a run reaches the
baseline's final loss) and the read on annealed baselines of several lengths."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tst_titan.analysis.runs import Run
from tst_titan.errors import RunError

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
