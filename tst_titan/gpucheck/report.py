"""The GPU check's report: ``report.md`` (a table, then each row's criteria, checks and
figures) and ``results.json`` (the same data), rewritten after every row so that a run
cut short still leaves a complete report of what finished."""

from __future__ import annotations

import json
from pathlib import Path

from tst_titan.analysis.fmt import format_number
from tst_titan.analysis.jsonio import write_json_atomic
from tst_titan.gpucheck.rows import Row

PENDING = {"status": "pending"}


def report_lines(rows: list[Row], header: dict, results: dict[str, dict]) -> list[str]:
    lines = ["# tst-titan GPU check", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "| row | status | time (s) | what |", "|---|---|---|---|"]
    for row in rows:
        result = results.get(row.name, PENDING)
        seconds = format_number(result.get("seconds"), ".0f")
        lines.append(f"| {row.name} | {result['status']} | {seconds} | {row.title} |")
        for sub in result.get("subrows", []):
            lines.append(f"| {row.name}/{sub['name']} | {sub['status']} | | {sub['title']}: {sub['summary']} |")
    lines += ["", "## Rows: criteria, checks and figures", ""]
    for row in rows:
        result = results.get(row.name, PENDING)
        spent = (f" ({result['seconds']:.0f} s of a {result['budget']} s budget)" if "seconds" in result else "")
        lines += [f"### {row.name}: {row.title}", "", f"Status: **{result['status']}**{spent}", "",
                  f"Pass criteria: {row.criteria}.", ""]
        if result.get("checks"):
            lines += ["```", *result["checks"], "```", ""]
        if result.get("figures"):
            lines += ["```json", json.dumps(result["figures"], indent=1, default=str), "```", ""]
        if result.get("error"):
            lines += ["```", result["error"], "```", ""]
    return lines


def write_report(out: Path, rows: list[Row], header: dict, results: dict[str, dict]) -> None:
    (out / "report.md").write_text("\n".join(report_lines(rows, header, results)) + "\n")
    write_json_atomic(out / "results.json", {"header": header, "rows": results})
