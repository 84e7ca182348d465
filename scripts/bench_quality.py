#!/usr/bin/env python
"""The data-rich CPU study: where Token Superposition Training pays off, at equal FLOPs.

    python scripts/bench_quality.py --jobs 2          # the study (hours on 2 CPU cores)
    python scripts/bench_quality.py --smoke --jobs 2  # every code path in ~1 minute
    python scripts/bench_quality.py --report-only     # rebuild report.md and the PNGs

Inputs: train_configs/study_cpu.toml (baseline) and tst_study_cpu.toml (TST s = 6,
r = 0.3) and the token stores they read (their comment gives the prepare commands;
``--train-store`` / ``--val-store`` point elsewhere). Every run is one process
(``OMP_NUM_THREADS=--threads``), fp32; ``--jobs 2`` runs two side by side.

Runs, in this order (the most important finish first):

1. **main**: baseline and TST (s = 6, r = 0.3) at the configs' length, seeds
   0..``--seeds``-1 (``debug.seed`` = k, ``data.shuffle_seed`` = 1000 + k);
2. **long**: the baseline at ``--long-factor`` x the steps (seed 0), for the equal-loss
   speed-up read the paper's way: the steps, FLOPs and wall-clock at which it reaches
   the TST runs' final loss;
3. **sweep**: baseline and TST s = 6 at ``--lengths`` x the steps (seed 0), the
   equal-FLOPs gap against tokens per parameter (with the main arms as the 1x point);
4. **ablation** (seed 0, TST config): s = 4, s = 8, ``input_only``, ``output_only``,
   ``at_switch = reset_optimizer``;
5. **sweep** at ``--long-factor`` x: TST s = 6 against the long baseline (the most
   data-rich point of the sweep).

Every run of an arm pair has the same model, steps, batch and LR schedule (AdamW,
warm-up 5% of the run's steps, the configs' WSD decay), so the same training FLOPs.

Resumable: a finished run writes ``results/<run>.json`` and is skipped by a rerun; an
unfinished run restarts from its own last checkpoint (or from scratch without one).
Writes under ``--out``: ``runs/<run>/`` (dump folder: TensorBoard, metrics.jsonl,
train.log, checkpoints), ``results/<run>.json``, ``report.md``, ``curves_main.png``,
``curves_ablations.png``, ``curves_long.png`` (the longest baseline/TST pair; scripts/compare_runs.py's
plots), ``gap_vs_length.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import compare_runs as cr  # noqa: E402

BASE_CONFIG = ROOT / "train_configs" / "study_cpu.toml"
TST_CONFIG = ROOT / "train_configs" / "tst_study_cpu.toml"
ABLATIONS = {
    "tst_s4": ["--tst.bag_size", "4"],
    "tst_s8": ["--tst.bag_size", "8"],
    "tst_input_only": ["--tst.mode", "input_only"],
    "tst_output_only": ["--tst.mode", "output_only"],
    "tst_reset_optimizer": ["--tst.at_switch", "reset_optimizer"],
}
# --smoke: the tiny flavor on the embedded corpus, every group of the study.
SMOKE = [
    "--model.flavor", "tiny", "--training.dataset", "embedded", "--validation.dataset", "embedded",
    "--training.seq_len", "32", "--training.local_batch_size", "2",
    "--validation.seq_len", "32", "--validation.local_batch_size", "4", "--validation.steps", "2",
    "--metrics.log_freq", "2",
]


@dataclass
class RunSpec:
    name: str
    group: str  # main | long | sweep | ablation
    arm: str  # baseline | tst_s6 | an ablation
    seed: int
    steps: int
    config: str
    overrides: list[str]
    val_passes: int

    @property
    def val_freq(self) -> int:
        return max(1, self.steps // self.val_passes)


@dataclass
class Result:
    """What a finished run leaves in results/<run>.json (everything the report needs)."""

    spec: dict
    command: list[str]
    attempts: list[dict]  # {start, end, rc, resumed_from_step, load_start, load_end}
    params: int
    final_step: int
    final_loss: float
    final_se: float | None
    val: list[list[float]]  # [step, loss, se or nan]
    data_tokens: list[list[float]]  # [step, cumulative] at log steps
    flops: list[list[float]]
    wall: list[list[float]]  # [step, seconds of training since the first logged step]
    positions_per_step: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec["name"]

    def run(self, name: str | None = None) -> cr.Run:
        def series(rows):
            a = np.array([r[:2] for r in rows], dtype=np.float64)
            return cr.Series(a[:, 0].astype(np.int64), a[:, 1])

        switch = self.extra.get("switch_step")
        return cr.Run(
            name=name or self.name, val=series(self.val), data_tokens=series(self.data_tokens),
            flops=series(self.flops), wall=series(self.wall),
            switch_step=switch, bag_size=self.extra.get("bag_size", 1),
        )

    @property
    def data_tokens_total(self) -> float:
        return self.data_tokens[-1][1]


# -- the plan ---------------------------------------------------------------------------
def build_plan(args, main_steps: int) -> list[RunSpec]:
    tst = ["--tst.enable"]
    plan: list[RunSpec] = []
    passes = args.val_passes

    def add(name, group, arm, seed, steps, tst_cfg, overrides, val_passes):
        cfg = str((TST_CONFIG if tst_cfg else BASE_CONFIG).relative_to(ROOT))
        plan.append(RunSpec(name, group, arm, seed, steps, cfg, overrides, val_passes))

    for k in range(args.seeds):
        add(f"baseline_seed{k}", "main", "baseline", k, main_steps, False, [], passes)
        add(f"tst_s6_seed{k}", "main", "tst_s6", k, main_steps, True, tst, passes)
    long_steps = round(main_steps * args.long_factor)
    if args.long_factor > 0:
        add(f"baseline_x{args.long_factor:g}_seed0", "long", "baseline", 0, long_steps, False, [],
            args.long_val_passes)
    sweep_passes = 1  # the gap needs the final loss only
    for f in args.lengths:
        steps = max(4, round(main_steps * f))
        add(f"baseline_x{f:.3g}_seed0", "sweep", "baseline", 0, steps, False, [], sweep_passes)
        add(f"tst_s6_x{f:.3g}_seed0", "sweep", "tst_s6", 0, steps, True, tst, sweep_passes)
    if args.long_factor > 0 and args.long_tst:  # before the ablations: longest runs first
        add(f"tst_s6_x{args.long_factor:g}_seed0", "sweep", "tst_s6", 0, long_steps, True, tst,
            args.long_val_passes)
    for arm in args.ablations:
        add(f"{arm}_seed0", "ablation", arm, 0, main_steps, True, tst + ABLATIONS[arm], passes)
    return plan


def run_command(spec: RunSpec, args, dump: Path) -> list[str]:
    warmup = max(1, round(0.05 * spec.steps))
    cmd = [  # one process: no torchrun (saves its start-up), the rendezvous comes from env
        sys.executable, "-m", "tst_titan.train", "--job.config_file", spec.config,
        "--job.dump_folder", str(dump),
        "--training.steps", str(spec.steps),
        "--lr_scheduler.warmup_steps", str(warmup),
        "--validation.freq", str(spec.val_freq),
        "--checkpoint.interval", str(max(1, spec.steps // 4)),
        "--debug.seed", str(spec.seed), "--data.shuffle_seed", str(1000 + spec.seed),
    ]
    if args.train_store:
        cmd += ["--training.dataset_path", str(args.train_store)]
    if args.val_store:
        cmd += ["--validation.dataset_path", str(args.val_store)]
    return cmd + (SMOKE if args.smoke else []) + list(args.extra) + spec.overrides


# -- running one run ----------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _latest_checkpoint(dump: Path) -> int | None:
    steps = []
    for p in (dump / "checkpoint").glob("step-*"):
        if (p / ".metadata").is_file():
            try:
                steps.append(int(p.name.split("-")[1]))
            except ValueError:
                pass
    return max(steps) if steps else None


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def execute(spec: RunSpec, args, params: int) -> Result:
    dump = args.out / "runs" / spec.name
    resumed = _latest_checkpoint(dump)
    attempts_f = dump / "attempts.json"
    attempts = json.loads(attempts_f.read_text()) if (resumed and attempts_f.is_file()) else []
    if resumed is None:
        shutil.rmtree(dump, ignore_errors=True)  # no checkpoint: start over
    dump.mkdir(parents=True, exist_ok=True)
    cmd = run_command(spec, args, dump)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1",
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    attempt = {"start": time.time(), "resumed_from_step": resumed, "load_start": os.getloadavg()[0]}
    attempts.append(attempt)
    _write_json(attempts_f, attempts)
    with open(dump / "train.log", "a") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    attempt.update(end=time.time(), rc=rc, load_end=os.getloadavg()[0])
    _write_json(attempts_f, attempts)
    if rc != 0:
        raise RuntimeError(f"{spec.name}: rc={rc}, see {dump / 'train.log'}")
    return collect(spec, dump, cmd, attempts, params)


def collect(spec: RunSpec, dump: Path, cmd, attempts, params: int) -> Result:
    rows = [json.loads(l) for l in (dump / "metrics.jsonl").read_text().splitlines() if l.strip()]
    val: dict[int, tuple[float, float]] = {}
    for r in rows:  # a resumed run appends again from its checkpoint: the last row wins
        if "validation_loss" in r:
            val[r["step"]] = (r["validation_loss"], r.get("validation_loss_se", float("nan")))
    if spec.steps not in val:
        raise RuntimeError(f"{spec.name}: no validation loss at the final step {spec.steps}")
    run = cr.load_run(dump, spec.name)
    tail = lambda s: [[int(a), float(b)] for a, b in zip(s.steps, s.values)]  # noqa: E731
    loss, se = val[spec.steps]
    res = Result(
        spec=asdict(spec), command=cmd, attempts=attempts, params=params, final_step=spec.steps,
        final_loss=loss, final_se=None if math.isnan(se) else se,
        val=[[s, l, e] for s, (l, e) in sorted(val.items())],
        data_tokens=tail(run.data_tokens), flops=tail(run.flops), wall=tail(run.wall),
        extra={"switch_step": run.switch_step, "bag_size": run.bag_size},
    )
    return res


def load_results(out: Path) -> dict[str, Result]:
    found = {}
    for f in sorted((out / "results").glob("*.json")):
        d = json.loads(f.read_text())
        found[d["spec"]["name"]] = Result(**d)
    return found


# -- progress -------------------------------------------------------------------------------
VAL_PASS_STEPS = 155  # a validation pass costs about this many training steps (917k tokens)


def _weight(spec: RunSpec) -> float:
    return spec.steps + VAL_PASS_STEPS * (spec.val_passes + 1)  # torchtitan also validates step 1


def _current_step(dump: Path) -> int:
    f = dump / "metrics.jsonl"
    if not f.is_file():
        return 0
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            fh.seek(max(0, size - 4096))
            lines = fh.read().decode(errors="replace").splitlines()
        if size > 4096:
            lines = lines[1:]  # the first line may be cut
        return max([json.loads(l).get("step", 0) for l in lines if l.strip().startswith("{")] or [0])
    except (ValueError, OSError):
        return 0


def _hms(sec: float) -> str:
    sec = max(0, int(sec))
    return f"{sec // 3600}:{sec % 3600 // 60:02d}:{sec % 60:02d}"


class Progress:
    def __init__(self, todo: list[RunSpec], out: Path, jobs: int, prior_s_per_step: float):
        self.todo, self.out, self.jobs, self.prior = todo, out, jobs, prior_s_per_step
        self.total = sum(_weight(s) for s in todo)
        self.done: set[str] = set()
        self.running: dict[str, RunSpec] = {}
        self.start_step: dict[str, int] = {}
        self.t0 = time.time()
        self.lock = threading.Lock()

    def started(self, spec: RunSpec) -> None:
        with self.lock:
            self.running[spec.name] = spec
            self.start_step[spec.name] = _current_step(self.out / "runs" / spec.name)

    def finished(self, spec: RunSpec) -> None:
        with self.lock:
            self.running.pop(spec.name, None)
            self.done.add(spec.name)

    def line(self) -> str:
        with self.lock:
            done_w = sum(_weight(s) for s in self.todo if s.name in self.done)
            parts, partial = [], 0.0
            for name, s in self.running.items():
                step = _current_step(self.out / "runs" / name)
                partial += _weight(s) * step / s.steps
                parts.append(f"{name} {step}/{s.steps}")
            now = time.time() - self.t0
            frac = (done_w + partial) / self.total if self.total else 1.0
            if frac > 0.02 and now > 120:
                eta = now * (1 - frac) / frac
            else:  # too early to measure: the calibrated rate
                eta = (self.total - done_w - partial) * self.prior / self.jobs
            end = time.strftime("%H:%M", time.gmtime(time.time() + eta))
            return (
                f"[study {_hms(now)}] {len(self.done)}/{len(self.todo)} runs done, running: "
                f"{', '.join(parts) or '-'}; {100 * frac:.0f}% of the work; ETA {_hms(eta)} "
                f"(~{end} UTC)"
            )


# -- the report -------------------------------------------------------------------------------
def _f(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _pm(loss: float, se: float | None) -> str:
    return f"{loss:.4f}" + ("" if se is None else f" ± {se:.4f}")


def shared_with(results: dict[str, Result]) -> dict[str, list[str]]:
    """For each run, the other runs of the study that ran at the same time for at least a
    quarter of its job time (or a minute): they shared the machine's cores."""
    spans = {n: [(a["start"], a.get("end", a["start"])) for a in r.attempts] for n, r in results.items()}
    out: dict[str, list[str]] = {}
    for n, mine in spans.items():
        need = min(60.0, 0.25 * sum(e - s for s, e in mine))
        out[n] = sorted(
            m for m, theirs in spans.items() if m != n and sum(
                max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in mine for s2, e2 in theirs) >= need
        )
    return out


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (f"{os.cpu_count()} CPU cores ({model}), {platform.system()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}")


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def _store_line(path: str | None) -> str:
    if not path:
        return "the configs' default"
    m = Path(path) / "manifest.json"
    if not m.is_file():
        return f"`{path}`"
    d = json.loads(m.read_text())
    return f"`{path}` ({d['num_documents']:,} documents, {d['num_tokens']:,} tokens, source {d['source']})"


def build_report(results: dict[str, Result], plan: list[RunSpec], args, meta: dict) -> str:
    by = {s.name: s for s in plan}
    main_steps = meta["main_steps"]
    params = meta["params"]
    pos = meta["positions_per_step"]
    share = shared_with(results)
    L = [
        f"# TST data-rich CPU study ({meta['date']})",
        "",
        f"- Machine: {meta['machine']}; "
        + ("runs at a time and threads: see the study command." if args.report_only
           else f"{args.jobs} run(s) at a time, {args.threads} thread(s) each."),
        *[f"- Study invocation {i + 1}: started {inv['started']} at commit {inv['commit']}: `{inv['command']}`."
          for i, inv in enumerate(meta.get("invocations", []))],
        f"- This report: commit {meta['commit']}, `{meta['command']}`.",
        f"- Model: `{meta['flavor']}` flavor, {params:,} parameters; {pos:,} positions per step "
        f"(equal in both phases, so equal FLOPs per step); main length {main_steps} steps = "
        f"{main_steps * pos / max(params, 1):.2f} baseline data tokens per parameter.",
        f"- Data: train {_store_line(meta['train_store'])}; held-out {_store_line(meta['val_store'])}.",
        f"- Schedule of every run: AdamW (lr from the configs), warm-up 5% of its steps, "
        f"the configs' WSD decay; TST s = 6, r = 0.3 unless named otherwise.",
        f"- Runs finished: {len(results)} of {len(plan)}."
        + (" **Incomplete study: missing " + ", ".join(s.name for s in plan if s.name not in results) + ".**"
           if len(results) < len(plan) else ""),
        "",
        "Validation loss: next-token loss on the same held-out windows in every run and pass; "
        "± is its standard error over held-out sequences (`validation_loss_se`; a difference of "
        "two runs on the same windows has a smaller one, the sequences being paired).",
        "",
        "## Every run",
        "",
        "| run | group | steps | final val loss ± SE | data tokens read | data tokens / parameter "
        "| training wall | job wall | shared the machine with |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in plan:
        r = results.get(s.name)
        if r is None:
            L.append(f"| {s.name} | {s.group} | {s.steps} | not run | | | | | |")
            continue
        job = sum(a.get("end", a["start"]) - a["start"] for a in r.attempts)
        restarts = len(r.attempts) - 1
        L.append(
            f"| {s.name} | {s.group} | {s.steps} | {_pm(r.final_loss, r.final_se)} "
            f"| {int(r.data_tokens_total):,} | {r.data_tokens_total / r.params:.3g} "
            f"| {_hms(r.wall[-1][1])} | {_hms(job)}{f' ({restarts} restart(s))' if restarts else ''} "
            f"| {', '.join(share.get(s.name, [])) or '-'} |"
        )

    # main arms
    L += ["", "## Equal FLOPs, main length: mean ± sd over seeds", ""]
    seeds = sorted({s.seed for s in plan if s.group == "main"})
    base = [results.get(f"baseline_seed{k}") for k in seeds]
    tst = [results.get(f"tst_s6_seed{k}") for k in seeds]
    pairs = [(b, t) for b, t in zip(base, tst) if b is not None and t is not None]

    def msd(xs):
        xs = list(xs)
        if not xs:
            return "n/a"
        return f"{statistics.mean(xs):.4f}" + (f" ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else "")

    L += ["| arm | seeds | final val loss (mean ± sd) | mean SE of one run |", "|---|---|---|---|"]
    for arm, rs in (("baseline", base), ("TST s = 6, r = 0.3", tst)):
        rs = [r for r in rs if r is not None]
        ses = [r.final_se for r in rs if r.final_se is not None]
        L.append(f"| {arm} | {len(rs)} | {msd(r.final_loss for r in rs)} | {_f(statistics.mean(ses) if ses else None)} |")
    gaps = [t.final_loss - b.final_loss for b, t in pairs]
    if gaps:
        L += ["", "Equal-FLOPs gap, TST − baseline of the same seed (negative: TST better): "
              + ", ".join(f"seed {k}: {g:+.4f}" for k, g in zip(seeds, gaps))
              + f"; **mean {statistics.mean(gaps):+.4f}"
              + (f" ± {statistics.stdev(gaps):.4f} (sd over seeds), "
                 f"± {statistics.stdev(gaps) / math.sqrt(len(gaps)):.4f} (standard error of the mean)**"
                 if len(gaps) > 1 else "**")]

    if pairs:
        avg = [cr.average_runs([x.run() for x in rs], f"{arm} (mean of {len(rs)})")
               for arm, rs in (("baseline", [b for b, _ in pairs]), ("tst_s6", [t for _, t in pairs]))]
        L += ["", "Same-length read (scripts/compare_runs.py on the seed-averaged curves: where TST "
              "first reaches the baseline's final loss):", "", cr.markdown_table(avg, avg[0]).rstrip()]

    # equal-loss speed-up, read on the long baseline
    long = results.get(f"baseline_x{args.long_factor:g}_seed0")
    L += ["", "## Equal-loss speed-up (read on the long baseline, the paper's way)", ""]
    if long is None or not pairs:
        L.append("Not available yet (needs the long baseline and the main TST runs).")
    else:
        lr = long.run()
        L += [
            f"The long baseline ({long.final_step} steps) reaches each TST run's final loss at the "
            f"step below (linear interpolation between validation points; its LR only decays in "
            f"its own last {meta['decay_pct']}%, so mid-run points are not annealed: this favours TST). "
            "Speed-up = what the baseline needs / what TST used.",
            "",
            "| TST run | its final loss | long baseline's step at that loss | speed-up: steps | FLOPs | wall-clock |",
            "|---|---|---|---|---|---|",
        ]
        rows = [(t.name, t) for _, t in pairs]
        if len(pairs) > 1:
            rows.append(("mean of seeds", None))
        for name, t in rows:
            if t is None:
                target = statistics.mean(x.final_loss for _, x in pairs)
                t_flops = statistics.mean(x.run().at(x.run().flops, x.final_step) for _, x in pairs)
                t_wall = statistics.mean(x.wall[-1][1] for _, x in pairs)
                t_steps = pairs[0][1].final_step
            else:
                target, tr = t.final_loss, t.run()
                t_flops, t_wall, t_steps = tr.at(tr.flops, t.final_step), t.wall[-1][1], t.final_step
            step = cr.first_step_reaching(lr, target)
            if step is None:
                L.append(f"| {name} | {target:.4f} | not reached in {long.final_step} | "
                         f"> {long.final_step / t_steps:.2f}x | > {long.final_step / t_steps:.2f}x | - |")
                continue
            L.append(
                f"| {name} | {target:.4f} | {step:.0f} | {step / t_steps:.2f}x "
                f"| {lr.at(lr.flops, step) / t_flops:.2f}x | {lr.at(lr.wall, step) / t_wall:.2f}x |"
            )

    # ablations
    L += ["", "## Ablations (seed 0, main length)", "",
          "| run | final val loss ± SE | − baseline seed 0 | − TST s = 6 seed 0 | data tokens read |",
          "|---|---|---|---|---|"]
    b0, t0 = results.get("baseline_seed0"), results.get("tst_s6_seed0")
    for name in ["baseline_seed0", "tst_s6_seed0"] + [f"{a}_seed0" for a in args.ablations]:
        r = results.get(name)
        if r is None:
            L.append(f"| {name} | not run | | | |")
            continue
        db = _f(r.final_loss - b0.final_loss, "+.4f") if b0 else "n/a"
        dt = _f(r.final_loss - t0.final_loss, "+.4f") if t0 else "n/a"
        L.append(f"| {name} | {_pm(r.final_loss, r.final_se)} | {db} | {dt} | {int(r.data_tokens_total):,} |")

    # gap against run length
    L += ["", "## Equal-FLOPs gap against run length", "",
          "| length | steps | baseline data tokens / parameter | TST data tokens / parameter "
          "| baseline loss | TST loss | gap TST − baseline |", "|---|---|---|---|---|---|---|"]
    points = gap_points(results, plan, args)
    for p in points:
        L.append(f"| {p['label']} | {p['steps']} | {p['tpp_base']:.3g} | {p['tpp_tst']:.3g} "
                 f"| {p['base']:.4f} | {p['tst']:.4f} | {p['gap']:+.4f} ± {p['err']:.4f} ({p['err_kind']}) |")
    L += ["", "Plots: `curves_main.png` (seed-averaged main arms and the long baseline against "
          "steps, data, wall-clock, FLOPs), `curves_ablations.png`, `curves_long.png` (the longest baseline/TST "
          "pair), `gap_vs_length.png`."]
    return "\n".join(L) + "\n"


def sweep_pairs(results: dict[str, Result], plan: list[RunSpec]) -> list[tuple[RunSpec, Result, Result]]:
    """The length sweep's finished (TST spec, baseline result, TST result) pairs, in plan order."""
    pairs = []
    for s in plan:
        if s.group == "sweep" and s.arm == "tst_s6":
            b, t = results.get(s.name.replace("tst_s6_", "baseline_")), results.get(s.name)
            if b is not None and t is not None:
                pairs.append((s, b, t))
    return pairs


def gap_points(results: dict[str, Result], plan: list[RunSpec], args) -> list[dict]:
    points = []
    main_seeds = sorted({s.seed for s in plan if s.group == "main"})
    for s, b, t in sweep_pairs(results, plan):
        err = math.hypot(t.final_se or 0.0, b.final_se or 0.0)
        points.append(dict(label=s.name.split("_")[2], steps=s.steps, base=b.final_loss, tst=t.final_loss,
                           gap=t.final_loss - b.final_loss, err=err, err_kind="SE, one seed",
                           tpp_base=b.data_tokens_total / b.params, tpp_tst=t.data_tokens_total / t.params))
    pairs = [(results.get(f"baseline_seed{k}"), results.get(f"tst_s6_seed{k}")) for k in main_seeds]
    pairs = [(b, t) for b, t in pairs if b is not None and t is not None]
    if pairs:
        gaps = [t.final_loss - b.final_loss for b, t in pairs]
        b, t = pairs[0]
        points.append(dict(
            label="x1 (main)", steps=b.final_step,
            base=statistics.mean(x.final_loss for x, _ in pairs), tst=statistics.mean(x.final_loss for _, x in pairs),
            gap=statistics.mean(gaps),
            err=statistics.stdev(gaps) if len(gaps) > 1 else math.hypot(t.final_se or 0.0, b.final_se or 0.0),
            err_kind=f"sd over {len(gaps)} seeds" if len(gaps) > 1 else "SE, one seed",
            tpp_base=b.data_tokens_total / b.params, tpp_tst=t.data_tokens_total / t.params))
    return sorted(points, key=lambda p: p["steps"])


def plot_gap(points: list[dict], out_png: Path, params: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [p["tpp_base"] for p in points]
    ax.errorbar(xs, [p["gap"] for p in points], yerr=[p["err"] for p in points], marker="o", capsize=4)
    for p in points:
        ax.annotate(f"{p['steps']} steps", (p["tpp_base"], p["gap"]), textcoords="offset points",
                    xytext=(6, 6), fontsize=8)
    ax.axhline(0, color="gray", linestyle=":")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(xs, [f"{x:.3g}" for x in xs])
    ax.set_xlabel(f"baseline data tokens per parameter ({params:,} parameters; TST reads 2.5x)")
    ax.set_ylabel("final val loss: TST − baseline (nats)")
    ax.set_title("Equal-FLOPs gap against run length (below 0: TST wins)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def write_report(results: dict[str, Result], plan: list[RunSpec], args, meta: dict) -> str:
    report = build_report(results, plan, args, meta)
    (args.out / "report.md").write_text(report)
    seeds = sorted({s.seed for s in plan if s.group == "main"})
    main_runs = []
    for arm in ("baseline", "tst_s6"):
        rs = [results[f"{arm}_seed{k}"].run() for k in seeds if f"{arm}_seed{k}" in results]
        if rs:
            main_runs.append(cr.average_runs(rs, f"{arm} (mean of {len(rs)} seed(s))"))
    long = results.get(f"baseline_x{args.long_factor:g}_seed0")
    if long is not None:
        main_runs.append(long.run())
    if main_runs:
        cr.plot(main_runs, main_runs[0], args.out / "curves_main.png",
                title=f"{meta['flavor']} flavor, {meta['main_steps']} steps x {meta['positions_per_step']:,} positions")
    abl = [results[n].run() for n in ["baseline_seed0", "tst_s6_seed0"] + [f"{a}_seed0" for a in args.ablations]
           if n in results]
    if len(abl) > 1:
        cr.plot(abl, abl[0], args.out / "curves_ablations.png", title="ablations, seed 0")
    # the longest length with both arms: where the gain is (the sweep's data-rich end)
    longest = max(sweep_pairs(results, plan), key=lambda p: p[0].steps, default=None)
    if longest is not None and longest[0].steps > meta["main_steps"]:
        spec, b, t = longest
        pair = [b.run(), t.run()]
        cr.plot(pair, pair[0], args.out / "curves_long.png",
                title=f"{meta['flavor']} flavor, {spec.steps} steps x {meta['positions_per_step']:,} positions")
    points = gap_points(results, plan, args)
    if points:
        plot_gap(points, args.out / "gap_vs_length.png", next(iter(results.values())).params)
    return report


# -- main ----------------------------------------------------------------------------------
def _study_facts(args) -> dict:
    """Steps, flavor, parameters and positions per step of the main runs (from the configs)."""
    import torch

    from tst_titan.model import TSTLlama3
    from tst_titan.specs import register_specs, tst_llama3_flavors
    from tst_titan.train import parse_config

    register_specs()
    argv = ["--job.config_file", str(BASE_CONFIG)] + (SMOKE if args.smoke else []) + list(args.extra)
    if args.steps:
        argv += ["--training.steps", str(args.steps)]
    cfg = parse_config(argv)
    with torch.device("meta"):
        model = TSTLlama3(tst_llama3_flavors[cfg.model.flavor])
    return dict(
        main_steps=cfg.training.steps, flavor=cfg.model.flavor,
        params=sum(p.numel() for p in model.parameters()),
        positions_per_step=cfg.training.local_batch_size * cfg.training.seq_len,
        decay_pct=round(100 * cfg.lr_scheduler.decay_ratio) if cfg.lr_scheduler.decay_ratio else 0,
        train_store=args.train_store or (None if args.smoke else cfg.training.dataset_path),
        val_store=args.val_store or (None if args.smoke else cfg.validation.dataset_path),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_quality")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (2 on 2 cores)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per run")
    ap.add_argument("--steps", type=int, default=None, help="main length (default: the configs')")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--long-factor", type=float, default=2.0, help="length of the long baseline, x main")
    ap.add_argument("--no-long-tst", dest="long_tst", action="store_false",
                    help="skip TST at the long length (the last run of the study)")
    ap.add_argument("--lengths", type=float, nargs="*", default=[1 / 8, 1 / 3],
                    help="shorter lengths of the sweep, x main (1x is the main arms)")
    ap.add_argument("--ablations", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS))
    ap.add_argument("--val-passes", type=int, default=3,
                    help="validation passes of a main-length run after the one at step 1")
    ap.add_argument("--long-val-passes", type=int, default=8,
                    help="validation passes of the long runs (denser: the equal-loss read)")
    ap.add_argument("--train-store", help="training token store (default: the configs' dataset_path)")
    ap.add_argument("--val-store", help="held-out token store (default: the configs')")
    ap.add_argument("--smoke", action="store_true", help="tiny model, embedded corpus: a ~1 min check")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="more overrides for every run (last argument group)")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from results/")
    ap.add_argument("--prior-s-per-step", type=float, default=0.8,
                    help="seconds per main step with --jobs runs side by side (early ETA)")
    args = ap.parse_args(argv)
    args.out = args.out.resolve()
    if args.smoke and args.steps is None:
        args.steps = 8
    for store in (args.train_store, args.val_store):
        if store and not Path(store).is_dir():
            ap.error(f"no token store at {store}")

    facts = _study_facts(args)
    if not args.smoke and not args.report_only:
        for key in ("train_store", "val_store"):
            p = Path(facts[key]) if Path(facts[key]).is_absolute() else ROOT / facts[key]
            if not (p / "manifest.json").is_file():
                print(f"bench_quality: error: no complete token store at {p} (prepare it with the "
                      f"command in {BASE_CONFIG.relative_to(ROOT)}'s comment)", file=sys.stderr)
                return 2
    plan = build_plan(args, facts["main_steps"])
    meta = dict(facts, machine=_machine(), commit=_commit(), date=time.strftime("%Y-%m-%d"),
                command=" ".join(["python scripts/bench_quality.py"] + (sys.argv[1:] if argv is None else argv)))
    (args.out / "results").mkdir(parents=True, exist_ok=True)
    study_f = args.out / "study.json"  # every invocation that ran runs: when, commit, command
    invocations = json.loads(study_f.read_text()) if study_f.is_file() else []
    if not args.report_only:
        invocations.append({"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                            "commit": meta["commit"], "command": meta["command"]})
        _write_json(study_f, invocations)
    meta["invocations"] = invocations
    results = load_results(args.out)
    todo = [s for s in plan if s.name not in results]
    for s in plan:
        if s.name in results:
            print(f"{s.name}: done earlier, kept", flush=True)
    if args.report_only:
        todo = []
    print(f"bench_quality: {len(plan)} runs ({len(todo)} to do), {meta['flavor']} flavor, "
          f"{facts['params']:,} parameters, main length {facts['main_steps']} steps, jobs {args.jobs}",
          flush=True)

    progress = Progress(todo, args.out, max(1, args.jobs), args.prior_s_per_step)
    failed: list[str] = []

    def one(spec: RunSpec) -> Result:
        progress.started(spec)
        print(f"start {spec.name} ({spec.steps} steps)\n" + progress.line(), flush=True)
        try:
            res = execute(spec, args, facts["params"])
            res.positions_per_step = facts["positions_per_step"]
            _write_json(args.out / "results" / f"{spec.name}.json", asdict(res))
            return res
        finally:
            progress.finished(spec)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        pending = {pool.submit(one, s): s for s in todo}
        while pending:
            done, _ = wait(pending, timeout=60 if not args.smoke else 5, return_when=FIRST_COMPLETED)
            for fut in done:
                spec = pending.pop(fut)
                try:
                    res = fut.result()
                    results[spec.name] = res
                    print(f"finished {spec.name}: final val loss {_pm(res.final_loss, res.final_se)}", flush=True)
                except Exception as e:  # one failed run does not stop the study
                    failed.append(spec.name)
                    print(f"FAILED {e}", flush=True)
            print(progress.line(), flush=True)

    report = write_report(results, plan, args, meta)
    print(report)
    print(f"wrote {args.out / 'report.md'}", flush=True)
    if failed:
        print(f"bench_quality: {len(failed)} run(s) failed: {', '.join(failed)} (rerun to retry)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
