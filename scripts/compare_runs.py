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
from pathlib import Path

from tst_titan.analysis.compare import annealed_table, downstream_section, markdown_table, pick_baseline, plot
from tst_titan.analysis.runs import load_run
from tst_titan.errors import RunError

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
        downstream = downstream_section([r.name for r in runs], args.runs)
        if downstream:
            table += "\n" + downstream
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
