"""Runs the study's plan: one process per run, ``jobs`` side by side, resumable.

A finished run leaves ``<results>/<run>.json`` (its raw result, meant to be committed)
and a rerun skips it; an unfinished run restarts from its own last checkpoint under
``<work>/runs/<run>/``. ``stop_by`` leaves a run whose estimated time would pass it for
the next invocation (a study may span sessions; a run cut off loses its work).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tst_titan.analysis.jsonio import write_json_atomic
from tst_titan.analysis.provenance import commit_of, machine_line
from tst_titan.analysis.runs import load_run
from tst_titan.analysis.study.plan import ROOT, RunSpec
from tst_titan.analysis.study.results import CLUSTERS_FILE, load_results, validation_clusters
from tst_titan.errors import RunError
from tst_titan.model import TSTLlama3
from tst_titan.specs import tst_llama3_flavors
from tst_titan.train import parse_config

VAL_PASS_STEPS = 90  # a validation pass costs about this many training steps of the study size
SIZE_COST = {"study": 1.0, "small": 0.45}  # seconds per step relative to the study size


def weight(spec: RunSpec) -> float:
    """The run's cost in study-size training steps (torchtitan also validates at step 1)."""
    return SIZE_COST.get(spec.size, 1.0) * (spec.steps + VAL_PASS_STEPS * (spec.val_passes + 1))


@dataclass
class StudySettings:
    work: Path  # runs/<run>/ dump folders (checkpoints, logs): not committed
    results: Path  # <run>.json raw results: committed
    jobs: int = 1
    threads: int = 1
    stop_by: float | None = None  # epoch seconds
    prior_s_per_step: float = 0.8  # with `jobs` runs side by side, until measured
    cwd: Path = ROOT


def model_facts(flavor: str) -> dict[str, int]:
    """Total and non-embedding parameters of a llama3 flavor (built on the meta device)."""
    with torch.device("meta"):
        model = TSTLlama3(tst_llama3_flavors[flavor])
    total = sum(p.numel() for p in model.parameters())
    emb = model.tok_embeddings.weight.numel() + model.output.weight.numel()
    return {"params": total, "params_non_embedding": total - emb}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def latest_checkpoint(dump: Path) -> int | None:
    steps = [int(p.name.split("-")[1]) for p in (dump / "checkpoint").glob("step-*")
             if (p / ".metadata").is_file() and p.name.split("-")[1].isdigit()]
    return max(steps) if steps else None


def current_step(dump: Path) -> int:
    """The last step in a run's metrics.jsonl (0 if none), read from the file's tail."""
    f = dump / "metrics.jsonl"
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            fh.seek(max(0, size - 4096))
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return 0
    if size > 4096:
        lines = lines[1:]  # the first line may be cut
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line).get("step", 0))
        except ValueError:
            pass
    return max(steps or [0])


def command(spec: RunSpec) -> list[str]:
    """The run's command line, without its dump folder (one process, no torchrun)."""
    return [sys.executable, "-m", "tst_titan.train", "--job.config_file", spec.config] + spec.overrides()


def execute(spec: RunSpec, s: StudySettings) -> dict[str, Any]:
    """Train one run (resuming from its own checkpoint) and return its raw result."""
    dump = s.work / "runs" / spec.name
    resumed = latest_checkpoint(dump)
    attempts_f = dump / "attempts.json"
    attempts = json.loads(attempts_f.read_text()) if (resumed and attempts_f.is_file()) else []
    log_f = dump / "train.log"
    if attempts and "end" not in attempts[-1] and log_f.is_file():
        # the runner itself was killed: the attempt ended when its log last grew
        attempts[-1].update(end=log_f.stat().st_mtime, rc=None, killed=True)
    if resumed is None:
        shutil.rmtree(dump, ignore_errors=True)  # no checkpoint: start over
    dump.mkdir(parents=True, exist_ok=True)
    cmd = command(spec)
    env = {**os.environ, "OMP_NUM_THREADS": str(s.threads), "PYTHONUNBUFFERED": "1",
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    attempt = {"start": time.time(), "resumed_from_step": resumed, "load_start": os.getloadavg()[0]}
    attempts.append(attempt)
    write_json_atomic(attempts_f, attempts)
    with open(dump / "train.log", "a") as log:
        rc = subprocess.run(cmd + ["--job.dump_folder", str(dump)], cwd=s.cwd, env=env,
                            stdout=log, stderr=subprocess.STDOUT).returncode
    attempt.update(end=time.time(), rc=rc, load_end=os.getloadavg()[0])
    write_json_atomic(attempts_f, attempts)
    if rc != 0:
        raise RunError(f"{spec.name}: exit {rc}, see {dump / 'train.log'}")
    return collect(spec, dump, cmd, attempts, s)


# where and when a run ran, not what it measured: a rerun may change these
RUN_CIRCUMSTANCES = ("commit", "machine", "date", "jobs", "threads", "wall", "attempts")


def reproduce(spec: RunSpec, s: StudySettings, committed: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Rerun a finished run from scratch in ``s.work`` (a scratch folder, never the
    study's) and return (its raw result, the measured fields that differ from
    ``committed``): the check that the runs of a study made at different commits trained
    the same way. On one machine and thread count CPU training is deterministic, so any
    difference at all is a change of the training path."""
    shutil.rmtree(s.work / "runs" / spec.name, ignore_errors=True)
    got = execute(spec, s)
    keys = sorted((set(committed) | set(got)) - set(RUN_CIRCUMSTANCES))
    return got, [k for k in keys if committed.get(k) != got.get(k)]


def run_config(spec: RunSpec, s: StudySettings):
    """The run's torchtitan config: its study config plus its overrides."""
    return parse_config(["--job.config_file", str(s.cwd / spec.config)] + spec.overrides())


def _store_facts(path: str) -> dict[str, Any]:
    p = Path(path) if Path(path).is_absolute() else ROOT / path
    m = p / "manifest.json"
    if not m.is_file():
        return {"path": path}
    d = json.loads(m.read_text())
    return {"path": path, "num_tokens": d.get("num_tokens"), "num_documents": d.get("num_documents"),
            "source": d.get("source")}


def collect(spec: RunSpec, dump: Path, cmd: list[str], attempts: list[dict], s: StudySettings) -> dict[str, Any]:
    """The raw result of a finished run, from its dump folder."""
    rows = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val: dict[int, tuple[float, float]] = {}
    for r in rows:  # a resumed run appends again from its checkpoint: the last row wins
        if "validation_loss" in r:
            val[r["step"]] = (r["validation_loss"], r.get("validation_loss_se", float("nan")))
    if spec.steps not in val:
        raise RunError(f"{spec.name}: no validation loss at the final step {spec.steps}")
    seq = dump / "validation" / f"step-{spec.steps}-rank-0.npy"
    seq_losses = np.load(seq).tolist() if seq.is_file() else None
    run = load_run(dump, spec.name)

    def pairs(series) -> list[list[float]]:
        return [[int(a), float(b)] for a, b in zip(series.steps, series.values)]

    cfg = run_config(spec, s)
    return {
        "name": spec.name, "spec": {**asdict(spec), "extra": list(spec.extra)},
        "command": " ".join(["python", "-m", "tst_titan.train"] + cmd[3:]),
        "commit": commit_of(s.cwd), "machine": machine_line(), "date": time.strftime("%Y-%m-%d"),
        "threads": s.threads, "jobs": s.jobs, "flavor": cfg.model.flavor,
        **model_facts(cfg.model.flavor),
        "positions_per_step": cfg.training.local_batch_size * cfg.training.seq_len,
        "lr": cfg.optimizer.lr, "decay_ratio": cfg.lr_scheduler.decay_ratio,
        **_stores(cfg),
        "switch_step": run.switch_step, "bag_size": run.bag_size,
        "val": [[st, lo, None if se != se else se] for st, (lo, se) in sorted(val.items())],
        "final_loss": val[spec.steps][0],
        # per held-out sequence, in reading order: clustered standard errors, paired gaps
        "final_sequence_losses": None if seq_losses is None else [round(x, 5) for x in seq_losses],
        "data_tokens": pairs(run.data_tokens), "flops": pairs(run.flops), "wall": pairs(run.wall),
        "attempts": attempts,
    }


class Progress:
    """Runs done, running (with their current step), share of the work and an ETA."""

    def __init__(self, todo: list[RunSpec], s: StudySettings):
        self.todo, self.s = todo, s
        self.total = sum(weight(x) for x in todo)
        self.done: set[str] = set()
        self.running: dict[str, RunSpec] = {}
        self.resumed_at: dict[str, int] = {}  # a resumed run's steps before this invocation
        self.t0 = time.time()
        self.lock = threading.Lock()

    def started(self, spec: RunSpec) -> None:
        resumed = latest_checkpoint(self.s.work / "runs" / spec.name) or 0
        with self.lock:
            self.running[spec.name] = spec
            self.resumed_at[spec.name] = resumed

    def finished(self, spec: RunSpec) -> None:
        with self.lock:
            self.running.pop(spec.name, None)
            self.done.add(spec.name)

    def seconds_per_weight(self) -> float:
        """Measured over this invocation once it has done some work, else the prior."""
        with self.lock:
            # work done in this invocation only: a resumed run's earlier steps took no time here
            done_w = sum(weight(x) * (1 - self.resumed_at.get(x.name, 0) / x.steps)
                         for x in self.todo if x.name in self.done)
            partial = sum(weight(x) * max(0, current_step(self.s.work / "runs" / n) - self.resumed_at.get(n, 0))
                          / x.steps for n, x in self.running.items())
        now = time.time() - self.t0
        work = done_w + partial
        if work > 0.02 * self.total and now > 120:
            return now * self.s.jobs / work
        return self.s.prior_s_per_step

    def line(self) -> str:
        with self.lock:
            done_w = sum(weight(x) for x in self.todo if x.name in self.done)
            parts, partial = [], 0.0
            for name, x in self.running.items():
                step = current_step(self.s.work / "runs" / name)
                partial += weight(x) * step / x.steps
                parts.append(f"{name} {step}/{x.steps}")
        now = time.time() - self.t0
        left = self.total - done_w - partial
        eta = left * self.seconds_per_weight() / self.s.jobs
        frac = (done_w + partial) / self.total if self.total else 1.0
        end = time.strftime("%H:%M", time.gmtime(time.time() + eta))
        return (f"[study {_hms(now)}] {len(self.done)}/{len(self.todo)} runs done, running: "
                f"{', '.join(parts) or '-'}; {100 * frac:.0f}% of the work; ETA {_hms(eta)} (~{end} UTC)")


def _hms(sec: float) -> str:
    sec = max(0, int(sec))
    return f"{sec // 3600}:{sec % 3600 // 60:02d}:{sec % 60:02d}"


def stores_of(spec: RunSpec, s: StudySettings) -> dict[str, Any]:
    """The token stores a run reads (path, size, corpus), from its config."""
    return _stores(run_config(spec, s))


def _stores(cfg) -> dict[str, Any]:
    return {
        "train_store": _store_facts(cfg.training.dataset_path) if cfg.training.dataset == "store" else None,
        "val_store": _store_facts(cfg.validation.dataset_path) if cfg.validation.dataset == "store" else None,
    }


def check_same_data(done: dict[str, Any], spec: RunSpec, s: StudySettings) -> None:
    """Refuse to add runs on other data than the finished ones (a study spans sessions and
    machines: the stores must be prepared the same way)."""
    now = stores_of(spec, s)
    for key in ("train_store", "val_store"):
        a, b = done.get(key), now[key]
        if (a or {}).get("source") != (b or {}).get("source") or (a or {}).get("num_tokens") != (b or {}).get("num_tokens"):
            raise RunError(
                f"{key}: {b and b.get('path')} holds {b and b.get('num_tokens')} tokens of corpus "
                f"{((b or {}).get('source') or {}).get('corpus')}, but the finished runs read "
                f"{a and a.get('num_tokens')} tokens of corpus {((a or {}).get('source') or {}).get('corpus')}; "
                "prepare the stores with the commands in the study configs' comment"
            )


def ensure_clusters(spec: RunSpec, raw: dict[str, Any], s: StudySettings) -> Path | None:
    """Write ``<results>/validation_clusters.json`` (the source file of each held-out
    window, for clustered standard errors) after the first finished run, when the
    held-out store was prepared from the python_env corpus (whose documents name their
    files). Other corpora keep the validator's i.i.d. standard errors."""
    f = s.results / CLUSTERS_FILE
    vs = raw.get("val_store") or {}
    src = vs.get("source") or {}
    seq = raw.get("final_sequence_losses")
    if f.is_file() or src.get("kind") != "python_env" or seq is None:
        return None
    cfg = run_config(spec, s)
    path = Path(vs["path"]) if Path(vs["path"]).is_absolute() else s.cwd / vs["path"]
    out = validation_clusters(str(path), tuple(src.get("packages") or ()) or None,
                              cfg.validation.seq_len + 1, len(seq))
    write_json_atomic(f, {**out, "store": vs["path"]})
    return f


def run_plan(plan: list[RunSpec], s: StudySettings, log: Callable[[str], None] = print) -> list[str]:
    """Run every run of ``plan`` without a result yet; returns the names that failed.
    A run that fails does not stop the others; a rerun retries it."""
    done = load_results(s.results)
    todo = [x for x in plan if x.name not in done]
    if done and todo:
        check_same_data(next(iter(done.values())).raw, todo[0], s)
    for x in plan:
        if x.name in done:
            log(f"{x.name}: done earlier, kept")
    log(f"study: {len(plan)} runs, {len(todo)} to do, {s.jobs} at a time, {s.threads} thread(s) each")
    progress = Progress(todo, s)
    failed: list[str] = []
    left: list[str] = []
    clusters_lock = threading.Lock()

    def one(spec: RunSpec) -> dict[str, Any] | None:
        if s.stop_by is not None:
            need = weight(spec) * progress.seconds_per_weight()
            if time.time() + need > s.stop_by:
                left.append(spec.name)
                return None
        progress.started(spec)
        log(f"start {spec.name} ({spec.steps} steps)\n" + progress.line())
        try:
            res = execute(spec, s)
            write_json_atomic(s.results / f"{spec.name}.json", res)
            with clusters_lock:
                ensure_clusters(spec, res, s)
            return res
        finally:
            progress.finished(spec)

    s.results.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, s.jobs)) as pool:
        pending = {pool.submit(one, x): x for x in todo}
        while pending:
            finished, _ = wait(pending, timeout=60, return_when=FIRST_COMPLETED)
            for fut in finished:
                spec = pending.pop(fut)
                try:
                    res = fut.result()
                    if res is not None:
                        log(f"finished {spec.name}: final val loss {res['final_loss']:.4f}")
                except Exception as e:  # noqa: BLE001 - one failed run does not stop the study
                    failed.append(spec.name)
                    log(f"FAILED {e}")
            if progress.running:
                log(progress.line())
    if left:
        log(f"study: {len(left)} run(s) left for the next invocation (--stop-by): {', '.join(left)}")
    return failed
