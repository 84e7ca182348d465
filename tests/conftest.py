"""Shared helpers: offline env, a tiny test config, and a torchrun launcher."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_CONFIG = ROOT / "tests" / "assets" / "tiny_cpu.toml"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(
    dump: Path, *overrides: str, nproc: int = 2, config: Path = TEST_CONFIG, module: str = "tst_titan.train"
) -> list[str]:
    """``torchrun -m <module>`` on CPU with gloo for one test job."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
        f"--rdzv_endpoint=localhost:{free_port()}",
        "-m", module,
        "--job.config_file", str(config),
        "--job.dump_folder", str(dump),
        *overrides,
    ]


def train_env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def run_train(
    dump: Path, *overrides: str, nproc: int = 2, config: Path = TEST_CONFIG, timeout: int = 300,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run ``torchrun -m tst_titan.train`` on CPU with gloo; returns the finished process."""
    cmd = train_cmd(dump, *overrides, nproc=nproc, config=config)
    return subprocess.run(cmd, cwd=ROOT, env=train_env(**(env or {})), capture_output=True, text=True,
                          timeout=timeout)


def run_entry(config: Path, *args: str) -> subprocess.CompletedProcess:
    """``tst_titan.train.main`` as one plain process (no torchrun), in this interpreter.

    Config errors must stop it before distributed init: with no ``MASTER_ADDR`` a run
    that got past the checks fails in torch's rendezvous (exit 1), so nothing joins a
    process group here. Run in-process because a fresh interpreter costs ~6 s of
    imports per case and the suite has dozens of these. Returns what a subprocess would:
    exit code and stderr (the ``tst-titan: error:`` line, or the traceback).
    """
    import contextlib
    import io
    import traceback

    from tst_titan import train

    argv = ["--job.config_file", str(config), *args]
    env = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in [*env, "MASTER_ADDR", "MASTER_PORT"]}
    os.environ.update(env)
    os.environ.pop("MASTER_ADDR", None)
    os.environ.pop("MASTER_PORT", None)
    out, err, rc = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                train.main(argv)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - reported like an uncaught error in a process
                traceback.print_exc()
                rc = 1
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(["tst_titan.train", *argv], rc, out.getvalue(), err.getvalue())


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        pytest.fail(f"run failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-20000:]}")
    return proc


def losses(dump: Path) -> dict[int, float]:
    rows = [json.loads(l) for l in (dump / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def rows(dump: Path) -> list[dict]:
    return [json.loads(l) for l in (dump / "metrics.jsonl").read_text().splitlines()]


def resume_copy(src: Path, dst: Path, step: int) -> None:
    """A dump folder holding only checkpoint step-<step> of ``src``: the state after a crash."""
    (dst / "checkpoint").mkdir(parents=True)
    shutil.copytree(src / "checkpoint" / f"step-{step}", dst / "checkpoint" / f"step-{step}")


# -- killing and resuming jobs (test_faults, test_multinode) ---------------------------
def children_of(pid: int) -> list[int]:
    """All descendants of ``pid`` (torchrun starts its workers in new sessions)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    for pid in [proc.pid, *children_of(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def loaded_step(log: str) -> int | None:
    for line in log.splitlines():
        if "Loading the checkpoint from" in line:
            return int(line.rsplit("step-", 1)[1].split(".")[0].split("/")[0])
    return None


# -- the embedded tokenizer (test_store, test_prepare) --------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    """The embedded BPE, as a run with ``hf_assets_path = "embedded"`` builds it."""
    from tst_titan.config import Data
    from tst_titan.data.tokenizer import build_tokenizer

    class _Cfg:
        class model:
            hf_assets_path = "embedded"

        data = Data()

    return build_tokenizer(_Cfg)


@pytest.fixture(scope="module")
def tok_dir():
    """Directory of the embedded BPE's tokenizer.json."""
    from tst_titan.config import Data
    from tst_titan.data.tokenizer import resolve_tokenizer_path

    return resolve_tokenizer_path("embedded", Data().embedded_vocab_size)


def wait_all(procs: list[subprocess.Popen], logs: Path, timeout: float = 600, pattern: str = "*.log") -> None:
    """Wait for every launched process (e.g. the nodes of a job); on a timeout kill them
    all, and fail with the tails of the logs matching ``pattern`` in ``logs``."""
    import time

    def tails() -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-4000:]}" for f in sorted(logs.glob(pattern)))

    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            kill_tree(p)
        pytest.fail(f"processes did not finish in {timeout} s:\n{tails()}")
    if any(p.returncode != 0 for p in procs):
        pytest.fail(f"rc={[p.returncode for p in procs]}:\n{tails()}")
