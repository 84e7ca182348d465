"""The comparison report of ``scripts/compare_runs.py``: markdown tables and the
four-panel PNG (validation loss against steps, data tokens, wall-clock, FLOPs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from tst_titan.analysis.fmt import format_number
from tst_titan.analysis.runs import Run
from tst_titan.analysis.speedup import SpeedUp, annealed_ends, annealed_speedup, equal_loss_speedup
from tst_titan.errors import RunError

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
                     f"| {format_number(su.baseline_steps, '.0f', 'no slope')}{mark} | {_x(su.steps)} | {_x(su.flops)} |")
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
            f"| {r.name} | {tst} | {r.final_step} | {loss} | {format_number(su.step, '.0f', 'not reached')} "
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


# Downstream scores (scripts/eval_lm.py): the first metric of this list a task reports is
# shown (acc_norm where lm-eval has it); chance: uniform guessing among the choices.
DOWNSTREAM_METRICS = ("acc_norm", "acc", "bits_per_byte", "word_perplexity")
CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "boolq": 0.5, "hellaswag": 0.25, "openbookqa": 0.25,
          "piqa": 0.5, "winogrande": 0.5, "mmlu": 0.25, "tst_tiny_mc": 0.25}


def load_lm_eval(run_dir: str | Path) -> dict | None:
    """``<run>/lm_eval/results.json`` of scripts/eval_lm.py, None when the run has none."""
    path = Path(run_dir) / "lm_eval" / "results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: not an lm-eval results JSON ({e})") from e
    if not isinstance(results, dict) or not isinstance(results.get("results"), dict):
        raise RunError(f"{path}: not an lm-eval results JSON (no 'results' table)")
    return results


def downstream_scores(results: dict) -> dict[str, dict[str, tuple[float, float | None]]]:
    """task -> metric -> (value, standard error or None), for tasks and groups that are
    not part of a reported group (MMLU's 57 subjects fold into one row)."""
    inside = {t for subs in (results.get("group_subtasks") or {}).values() for t in subs}
    out: dict[str, dict[str, tuple[float, float | None]]] = {}
    for task, metrics in results["results"].items():
        if task in inside:
            continue
        got = {}
        for m in DOWNSTREAM_METRICS:
            v, se = metrics.get(f"{m},none"), metrics.get(f"{m}_stderr,none")
            if isinstance(v, (int, float)):
                got[m] = (float(v), float(se) if isinstance(se, (int, float)) else None)
        if got:
            out[task] = got
    return out


def _score(v: float, se: float | None, spec: str = ".4f") -> str:
    return format(v, spec) + ("" if se is None else f" ± {se:.4f}")


def downstream_table(names: list[str], results: list[dict]) -> str:
    """One row per task: each run's score ± lm-eval's standard error; with two runs the
    difference (second minus first) ± the two errors combined."""
    scores = [downstream_scores(r) for r in results]
    tasks = list(dict.fromkeys(t for s in scores for t in s))
    limited = [n for n, r in zip(names, results) if (r.get("config") or {}).get("limit") is not None]
    lines = [
        "Downstream (lm-eval, zero-shot, scripts/eval_lm.py; ± is lm-eval's standard error over "
        "the task's items, about a 68% interval):",
        "",
        "| task | metric | chance | " + " | ".join(names) + (" | difference |" if len(names) == 2 else ""),
        "|---|---|---|" + "---|" * (len(names) + (len(names) == 2)),
    ]
    for t in tasks:
        common = [m for m in DOWNSTREAM_METRICS if all(m in s.get(t, {}) for s in scores)]
        m = common[0] if common else next(m for m in DOWNSTREAM_METRICS if any(m in s.get(t, {}) for s in scores))
        cells = [_score(*s[t][m]) if m in s.get(t, {}) else "-" for s in scores]
        if len(names) == 2:
            if common:
                (a, sa), (b, sb) = scores[0][t][m], scores[1][t][m]
                se = math.hypot(sa, sb) if sa is not None and sb is not None else None
                cells.append(_score(b - a, se, "+.4f"))
            else:
                cells.append("-")
        chance = f"{CHANCE[t]:.2f}" if t in CHANCE and m.startswith("acc") else "-"
        lines.append(f"| {t} | {m} | {chance} | " + " | ".join(cells) + " |")
    if limited:
        lines += ["", f"Evaluated with --limit (a smoke test, not scores): {', '.join(limited)}."]
    return "\n".join(lines) + "\n"


def downstream_section(names: list[str], run_dirs: list[str | Path]) -> str:
    """The downstream table when every run has lm-eval results, a one-line note when only
    some have, '' when none has."""
    results = [load_lm_eval(d) for d in run_dirs]
    have = [r is not None for r in results]
    if all(have):
        return downstream_table(names, results)  # type: ignore[arg-type]
    if any(have):
        missing = ", ".join(n for n, h in zip(names, have) if not h)
        return f"Downstream scores: no lm_eval/results.json for {missing} (run scripts/eval_lm.py on it).\n"
    return ""
