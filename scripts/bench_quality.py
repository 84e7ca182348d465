#!/usr/bin/env python
"""The data-rich CPU quality study: where Token Superposition Training pays off.

    python scripts/bench_quality.py --jobs 2                  # run (or continue) the study
    python scripts/bench_quality.py --jobs 2 --stop-by 14:40  # start no run that would end later
    python scripts/bench_quality.py --report-only             # docs/RESULTS.md's study section + plots from docs/results/
    python scripts/bench_quality.py --smoke --jobs 2          # every code path in about a minute
    python scripts/bench_quality.py --reproduce RUN           # rerun a finished run: bitwise the same?

The plan, the runner and the report live in tst_titan/analysis/study/. Each finished
run writes its raw result to ``--results`` (default docs/results/study/, committed); a
rerun skips finished runs and resumes unfinished ones from their checkpoints under
``--work``. The study spans sessions: commit the results as they land.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tst_titan.analysis.study.plan import ROOT, smoke_plan, study_plan
from tst_titan.analysis.study.report import build_report, replace_section, write_plots
from tst_titan.analysis.study.results import load_clusters, load_results
from tst_titan.analysis.study.runner import StudySettings, reproduce, run_plan
from tst_titan.errors import USER_ERRORS


def _epoch_of(hhmm: str) -> float:
    """Today's (or tomorrow's) UTC epoch seconds of 'HH:MM'."""
    h, m = (int(x) for x in hhmm.split(":"))
    now = time.time()
    t = now - now % 86400 + h * 3600 + m * 60
    return t if t > now else t + 86400


def write_report(plan, args, argv: list[str] | None) -> None:
    """Regenerate the study section and figures from the raw results alone."""
    results = load_results(args.results)
    clusters = load_clusters(args.results)
    command = " ".join(["python scripts/bench_quality.py"] + (sys.argv[1:] if argv is None else argv))
    section = build_report(results, clusters, plan, command)
    target = args.report
    old = target.read_text() if target.is_file() else ""
    try:
        new = replace_section(old, section)
    except ValueError:
        new = section
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(new)
    figures = write_plots(results, clusters, args.img)
    print(section, flush=True)
    print(f"wrote {target} and {', '.join(str(f) for f in figures) or 'no figures'}", flush=True)


def reproduce_runs(plan, args) -> int:
    """Rerun each named finished run under <work>/reproduce and compare it with its committed
    result: 0 when every measured field is identical, 1 otherwise."""
    specs = {p.name: p for p in plan}
    settings = StudySettings(work=(args.work / "reproduce").resolve(), results=args.results.resolve(),
                             threads=args.threads)
    rc = 0
    for name in args.reproduce:
        f = args.results / f"{name}.json"
        if name not in specs or not f.is_file():
            print(f"bench_quality: error: --reproduce {name}: not a finished run of this plan "
                  f"(no {f})", file=sys.stderr)
            return 2
        committed = json.loads(f.read_text())
        got, differ = reproduce(specs[name], settings, committed)
        was = f"commit {committed['commit']} -> {got['commit']}"
        if differ:
            rc = 1
            print(f"{name}: DIFFERS from the committed result ({was}) in: {', '.join(differ)}", flush=True)
        else:
            print(f"{name}: identical to the committed result ({was}): final loss {got['final_loss']!r}, "
                  f"{len(got['val'])} validation points, {len(got['final_sequence_losses'] or [])} "
                  "held-out windows, bit for bit", flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "study",
                    help="raw results, one JSON per finished run (commit them)")
    ap.add_argument("--work", type=Path, default=ROOT / "outputs" / "study",
                    help="dump folders of the runs (checkpoints, logs)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (2 on 2 cores)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per run")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--stop-by", help="HH:MM UTC: start no run estimated to end after it")
    ap.add_argument("--smoke", action="store_true", help="tiny model, embedded corpus, toy lengths")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the report")
    ap.add_argument("--reproduce", nargs="+", metavar="RUN",
                    help="rerun finished runs in <work>/reproduce and compare them with their committed results")
    ap.add_argument("--report", type=Path, default=ROOT / "docs" / "RESULTS.md",
                    help="markdown file whose study section (between its markers) is regenerated; "
                         "a file without the markers is written whole")
    ap.add_argument("--img", type=Path, default=ROOT / "docs" / "img", help="folder of the figures")
    args = ap.parse_args(argv)
    plan = smoke_plan() if args.smoke else study_plan(args.seeds)
    if args.reproduce:
        try:
            return reproduce_runs(plan, args)
        except USER_ERRORS as e:
            print(f"bench_quality: error: {e}", file=sys.stderr)
            return 2
    failed: list[str] = []
    if not args.report_only:
        settings = StudySettings(work=args.work.resolve(), results=args.results.resolve(), jobs=args.jobs,
                                 threads=args.threads,
                                 stop_by=_epoch_of(args.stop_by) if args.stop_by else None)
        try:
            failed = run_plan(plan, settings, log=lambda m: print(m, flush=True))
        except USER_ERRORS as e:
            print(f"bench_quality: error: {e}", file=sys.stderr)
            return 2
    write_report(plan, args, argv)
    if failed:
        print(f"bench_quality: {len(failed)} run(s) failed: {', '.join(failed)} (rerun to retry)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
