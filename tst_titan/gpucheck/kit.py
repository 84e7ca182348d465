"""GPU check: every CUDA path of tst-titan on one GPU, in one command, in under 10 minutes.

    bash scripts/gpu_check.sh [OUT_DIR] [--only ROW,ROW]   # installs what is missing, then runs this
    python scripts/gpu_check.py --out OUT_DIR [--only ROW,ROW] [--budget ROW=SECONDS]

Each row runs in its own process (``--run-row``) with a time budget, inside one kit
deadline; ``OUT_DIR/report.md`` is rewritten after every row, with the row's pass/fail
criteria, checks, figures and verdict. ``OUT_DIR/results.json`` holds the same, and
``OUT_DIR/rows.log`` the tail of every row's output (run directories, checkpoints and
full logs stay in the work directory, ``--work``, outside OUT_DIR). Without CUDA the
CUDA rows read "not run: no CUDA" and the others run. Exit code 1 when a row that ran
failed, 0 otherwise. The rows: :mod:`tst_titan.gpucheck.rows`.

(``GPU_CHECK_CPU_DRY_RUN=1`` runs the CUDA rows on CPU at toy sizes where they can run at
all, to check the kit's own plumbing; their verdicts mean nothing there.)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from tst_titan.analysis.jsonio import write_json_atomic
from tst_titan.analysis.provenance import commit_of, machine_line
from tst_titan.gpucheck.criteria import verdict
from tst_titan.gpucheck.report import write_report
from tst_titan.gpucheck.rows import ROW_BY_NAME, ROWS, Row
from tst_titan.gpucheck.runs import ROOT, RowContext, offline_env, tail

DEADLINE_S = 540  # the whole kit, install excluded: a lent machine runs a command for 10 minutes
MIN_ROW_S = 15  # no row starts with less of the deadline left
CPU_DRY_RUN = os.environ.get("GPU_CHECK_CPU_DRY_RUN") == "1"


def has_cuda() -> bool:
    return torch.cuda.is_available()


def header_of(out: Path, work: Path, cuda: bool, deadline: float, extra_args: list[str]) -> dict:
    gpu = f"CUDA ({torch.cuda.get_device_name(0)})" if cuda else "no CUDA"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": os.environ.get("GPU_CHECK_COMMIT") or commit_of(ROOT),
        "machine": f"{machine_line()}, {gpu}",
        "command": " ".join(["bash scripts/gpu_check.sh", str(out), *extra_args]),
        "work directory": str(work), "kit deadline (s)": int(deadline),
    }


def run_row_process(row: Row, work: Path, budget: int) -> dict:
    """Run one row in its own process group, killed with everything it started after
    ``budget`` seconds; its result (or why there is none)."""
    result_path, log_path = work / f"{row.name}.result.json", work / "logs" / f"{row.name}.log"
    result_path.unlink(missing_ok=True)
    row_work = work / row.name
    row_work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "tst_titan.gpucheck.kit", "--run-row", row.name, "--work", str(row_work),
           "--result", str(result_path)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=offline_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the row and everything it started
            proc.wait()
            return {"status": f"FAIL: timed out after {budget} s"}
    if result_path.exists():
        return json.loads(result_path.read_text())
    return {"status": f"FAIL: row process exited {rc} without a result", "error": tail(log_path, 30)}


def run_kit(out: Path, work: Path, only: list[str] | None, budgets: dict[str, int], deadline: float,
            extra_args: list[str] = ()) -> int:
    out.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    cuda = has_cuda()
    t_start = time.time()
    header = header_of(out, work, cuda, deadline, list(extra_args))
    results: dict[str, dict] = {}
    rows_log = out / "rows.log"
    rows_log.write_text("")
    for row in ROWS:
        left = deadline - (time.time() - t_start)
        if only and row.name not in only:
            results[row.name] = {"status": "not run: not selected (--only)"}
            continue
        if row.cuda_only and not cuda and not CPU_DRY_RUN:
            results[row.name] = {"status": "not run: no CUDA"}
            continue
        if left < MIN_ROW_S:
            results[row.name] = {"status": f"not run: kit deadline ({int(deadline)} s) reached"}
            continue
        budget = min(budgets.get(row.name, row.budget_s), int(left))
        results[row.name] = {"status": "running", "budget": budget}
        write_report(out, ROWS, header, results)
        print(f"[gpu_check] {row.name}: budget {budget} s ...", flush=True)
        t0 = time.time()
        result = run_row_process(row, work, budget)
        seconds = time.time() - t0
        result.update(seconds=round(seconds, 1), budget=budget)
        results[row.name] = result
        with open(rows_log, "a") as log:
            log.write(f"===== {row.name}: {result['status']} ({seconds:.0f} s) =====\n"
                      f"{tail(work / 'logs' / f'{row.name}.log')}\n\n")
        print(f"[gpu_check] {row.name}: {result['status']} ({seconds:.0f} s)", flush=True)
        write_report(out, ROWS, header, results)
    header["total (s)"] = round(time.time() - t_start, 1)
    write_report(out, ROWS, header, results)
    failed = [name for name, r in results.items() if r["status"].startswith("FAIL")]
    print(f"[gpu_check] report: {out / 'report.md'}; failed rows: {', '.join(failed) or 'none'}", flush=True)
    return 1 if failed else 0


def run_one_row(name: str, work: Path, result_path: Path) -> int:
    """The body of a row's process: measure, apply the spec's checks, write the result."""
    row = ROW_BY_NAME[name]
    ctx = RowContext(work=work, cuda=has_cuda())
    spec = row.spec if ctx.cuda else row.spec.for_cpu()
    try:
        measured = row.measure_fn()(ctx, spec)
        status, lines = verdict(spec.checks(measured))
        result = {"status": status, "figures": measured.figures, "checks": lines}
        subrows = spec.subrows(measured)
        if subrows:
            result["subrows"] = subrows
    except Exception as e:  # noqa: BLE001 - a crash is the row's result
        traceback.print_exc()
        first_line = str(e).splitlines()[0][:200] if str(e) else ""
        result = {"status": f"FAIL: {type(e).__name__}: {first_line}", "error": traceback.format_exc()[-3000:]}
    write_json_atomic(result_path, json.loads(json.dumps(result, default=str)))
    return 0


def parse_budgets(items: list[str]) -> dict[str, int]:
    """``ROW=SECONDS`` items; ValueError names the first one that is not."""
    budgets = {}
    for item in items:
        name, _, seconds = item.partition("=")
        if not seconds.isdigit():
            raise ValueError(f"--budget {item!r}: expected ROW=SECONDS")
        budgets[name] = int(seconds)
    return budgets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "outputs" / "gpu_check"), help="report directory")
    p.add_argument("--work", help="scratch directory for runs (default: a new one under /tmp)")
    p.add_argument("--only", help="comma-separated rows to run (the others: 'not run')")
    p.add_argument("--budget", action="append", default=[], metavar="ROW=SECONDS", help="override a row's budget")
    p.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds for the whole kit")
    p.add_argument("--run-row", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_row:
        return run_one_row(args.run_row, Path(args.work), Path(args.result))
    only = args.only.split(",") if args.only else None
    try:
        budgets = parse_budgets(args.budget)
    except ValueError as e:
        p.error(str(e))
    unknown = [n for n in [*(only or []), *budgets] if n not in ROW_BY_NAME]
    if unknown:
        p.error(f"unknown rows {unknown}; rows: {list(ROW_BY_NAME)}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    extra = [*(["--only", args.only] if args.only else []), *(f"--budget {b}" for b in args.budget)]
    return run_kit(Path(args.out), work, only, budgets, args.deadline, extra)


if __name__ == "__main__":
    sys.exit(main())
