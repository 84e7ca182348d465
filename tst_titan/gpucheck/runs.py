"""Launching the processes a GPU-check row runs, and reading what they wrote.

Every command runs from the checkout's root with its output in a log file (the report
keeps only the tail); training runs go through ``torch.distributed.run``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import tst_titan

ROOT = Path(tst_titan.__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
CONFIGS = ROOT / "train_configs"
TINY_CONFIG = ROOT / "tests" / "assets" / "tiny_cpu.toml"
TRAIN_MODULE = "tst_titan.train"
LAUNCH_MODULE = "tst_titan.gpucheck.launch"  # tst_titan.train plus the check's switches
# Logged with every step by LAUNCH_MODULE under GPU_CHECK_PEAK_MEMORY=1 (CUDA only).
PEAK_ALLOCATED_KEY = "memory/max_allocated_bytes"


@dataclasses.dataclass
class RowContext:
    """Where a row works (a directory of its own) and whether CUDA is there."""

    work: Path
    cuda: bool


def offline_env(**extra: str) -> dict[str, str]:
    """This process's environment, offline (the lent machine has no internet), unbuffered."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.update(extra)
    return env


def tail(path: Path, lines: int = 60) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_logged(cmd: list, log_path: Path, env: dict | None = None, timeout: float | None = None) -> int:
    """Run ``cmd`` from the checkout's root with its output in ``log_path``; echo the
    command and the log's last lines; return the exit code."""
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env or offline_env(), stdout=log,
                              stderr=subprocess.STDOUT, timeout=timeout)
    print(tail(log_path, 25), flush=True)
    return proc.returncode


def torchrun(ctx: RowContext, dump: Path, config: Path, *overrides: str, nproc: int = 1,
             module: str = TRAIN_MODULE, env: dict | None = None) -> int:
    """One training job; its log is ``<dump>.log`` next to the dump folder. Validation is
    off (the paper configs validate on a held-out DCLM store a check machine lacks); a row
    can turn it on in ``overrides``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
           "--rdzv_endpoint=localhost:0", "-m", module, "--job.config_file", config, "--job.dump_folder", dump,
           "--validation.no-enable", *overrides]
    dump.parent.mkdir(parents=True, exist_ok=True)
    extra = {} if ctx.cuda else {"OMP_NUM_THREADS": "1"}
    return run_logged(cmd, run_log(dump), env=offline_env(**extra, **(env or {})))


def run_log(dump: Path) -> Path:
    return dump.parent / f"{dump.name}.log"


def log_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def metrics_rows(dump: Path) -> list[dict]:
    """The run's ``metrics.jsonl`` (written by rank 0), one dict per logged step."""
    path = dump / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_rows(dump: Path) -> list[dict]:
    return [r for r in metrics_rows(dump) if "loss" in r]


def step_losses(dump: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in loss_rows(dump)}


def step_values(dump: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in loss_rows(dump) if key in r}


def first_run_losses(base: Path, name: str) -> dict[int, float]:
    """Losses of the first run called ``name<n>`` under a pytest base temp directory."""
    for run in sorted(base.glob(f"{name}[0-9]*")):
        if (run / "metrics.jsonl").exists():
            return step_losses(run)
    return {}


def prepare_store(ctx: RowContext, vocab: int) -> Path:
    """A token store of the embedded corpus with a BPE of ``vocab`` tokens (made once per work dir)."""
    store = ctx.work / f"store-embedded-v{vocab}"
    if not (store / "manifest.json").exists():
        rc = run_logged([sys.executable, SCRIPTS / "prepare_data.py", "--source", "embedded", "--tokenizer",
                         "embedded", "--vocab-size", vocab, "--out", store], ctx.work / f"{store.name}.log")
        if rc != 0:
            raise RuntimeError(f"prepare_data.py exited {rc}")
    return store
