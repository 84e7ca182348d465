"""Two "nodes" on one machine: ``scripts/train.sh`` with ``NNODES=2`` and a c10d rendezvous.

Each node is its own torchrun launch of one gloo process (local rank 0 on both); together they
must form world size 2 and train exactly like one launch of 2 processes: the same loss at every
step, bit for bit (the same 2-rank gloo reductions in the same order), and the same batches
(``data.trace`` digests of global ranks 0 and 1), across the TST switch at step 4.

Then one node dies mid-run: every process of node 1 is SIGKILLed after a checkpoint. Node 0 must
fail by itself (gloo sees its peer gone), and the two unchanged commands, launched again, must
resume from the last complete checkpoint and end exactly like the uninterrupted run.

``scripts/multinode.slurm`` is checked by its dry run: the torchrun command it prints for given
SLURM variables.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, TEST_CONFIG, free_port, kill_tree, loaded_step, losses, ok, run_train, train_env, wait_all

ARGS = ("--checkpoint.enable", "--checkpoint.interval", "1", "--data.trace")
STEPS = 8  # tests/assets/tiny_cpu.toml: superposition steps 1-4, next-token steps 5-8


def node_env(node_rank: int, port: int, **extra: str) -> dict:
    return train_env(NNODES="2", NGPU="1", NODE_RANK=str(node_rank), RDZV_ENDPOINT=f"localhost:{port}",
                     RDZV_ID="test-multinode", CONFIG_FILE=str(TEST_CONFIG), **extra)


def launch_nodes(dump: Path, port: int, logs: Path) -> list[subprocess.Popen]:
    """Start node 0 and node 1: the same ``scripts/train.sh`` command, each with its NODE_RANK."""
    procs = []
    for node in (0, 1):
        with open(logs / f"node{node}.log", "a") as f:
            procs.append(subprocess.Popen(
                ["bash", "scripts/train.sh", "--job.dump_folder", str(dump), *ARGS],
                cwd=ROOT, env=node_env(node, port), stdout=f, stderr=subprocess.STDOUT))
    return procs


def log_tail(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-5000:]}" for p in sorted(logs.glob("node*.log")))


def trace_lines(dump: Path) -> dict[tuple[int, int], list[str]]:
    """(global rank, step) -> the digests of every time that step's batch was served."""
    out: dict[tuple[int, int], list[str]] = {}
    for rank in (0, 1):
        for line in (dump / "data_trace" / f"rank{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            out.setdefault((rank, row["step"]), []).append(row["sha1"])
    return out


def complete_checkpoints(dump: Path) -> list[int]:
    folder = dump / "checkpoint"
    return sorted(int(d.name.split("-")[1]) for d in folder.glob("step-*") if (d / ".metadata").exists())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One torchrun launch of 2 processes, uninterrupted."""
    dump = tmp_path_factory.mktemp("multinode") / "ref"
    ok(run_train(dump, *ARGS))
    assert sorted(losses(dump)) == list(range(1, STEPS + 1))
    return dump


@pytest.mark.slow
def test_two_nodes_train_like_one_launch(reference, tmp_path):
    dump = tmp_path / "job"
    wait_all(launch_nodes(dump, free_port(), tmp_path), tmp_path, pattern="node*.log")

    want, got = losses(reference), losses(dump)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == want[step], f"step {step}: {got[step]!r} != {want[step]!r}"
    t_ref, t_got = trace_lines(reference), trace_lines(dump)
    assert len(t_got) == 2 * STEPS, "two global ranks, one trace line per step each"
    assert t_got == t_ref


@pytest.mark.slow
def test_node_killed_then_relaunched_resumes_exactly(reference, tmp_path):
    dump, port = tmp_path / "job", free_port()
    procs = launch_nodes(dump, port, tmp_path)
    deadline = time.monotonic() + 300
    while not (dump / "checkpoint" / "step-2" / ".metadata").exists():
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            for p in procs:
                kill_tree(p)
            pytest.fail(f"checkpoint step-2 never completed:\n{log_tail(tmp_path)}")
        time.sleep(0.02)
    kill_tree(procs[1])  # node 1 dies: its torchrun agent and its worker, at once
    try:
        rc0 = procs[0].wait(timeout=120)
    except subprocess.TimeoutExpired:
        kill_tree(procs[0])
        pytest.fail(f"node 0 kept running without node 1:\n{log_tail(tmp_path)}")
    assert rc0 != 0, "node 0 must fail once node 1 is gone"
    saved = complete_checkpoints(dump)
    assert 2 <= saved[-1] < STEPS, f"killed mid-run, checkpoints {saved}"
    first_log = (tmp_path / "node0.log").read_text()
    assert loaded_step(first_log) is None

    for p in tmp_path.glob("node*.log"):
        p.write_text("")  # keep only the relaunch's lines
    wait_all(launch_nodes(dump, port, tmp_path), tmp_path, pattern="node*.log")  # the same two commands again
    for node in (0, 1):
        assert loaded_step((tmp_path / f"node{node}.log").read_text()) == saved[-1], log_tail(tmp_path)

    want, got = losses(reference), losses(dump)  # metrics.jsonl: the last row of a step wins
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == want[step], f"step {step}: {got[step]!r} != {want[step]!r}"
    t_ref, t_got = trace_lines(reference), trace_lines(dump)
    assert sorted(t_got) == sorted(t_ref)
    replayed = [k for k, v in t_got.items() if len(v) > 1]
    assert all(k[1] > saved[-1] for k in replayed), f"only steps after step-{saved[-1]} run twice: {replayed}"
    for key, digests in t_got.items():  # the replay served the very batches of the first attempt
        assert digests == [t_ref[key][0]] * len(digests), key


def dry_run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") and k not in ("NNODES", "NODE_RANK", "RDZV_ENDPOINT", "RDZV_ID", "RDZV_PORT",
                                                        "NGPU", "CONFIG_FILE", "LOG_RANK")}
    return subprocess.run(["bash", script, *args], cwd=ROOT, env={**base, "DRY_RUN": "1", **env},
                          capture_output=True, text=True, timeout=60)


def test_train_sh_single_node_command_unchanged():
    proc = dry_run("scripts/train.sh", "--training.steps", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        "torchrun --nproc_per_node=2 --rdzv_backend c10d --rdzv_endpoint=localhost:0 "
        "--local-ranks-filter 0 --role rank --tee 3 -m tst_titan.train "
        "--job.config_file train_configs/tst_debug_cpu.toml --training.steps 3")
    assert dry_run("scripts/train.sh", NNODES="1", NGPU="4").stdout.startswith("torchrun --nproc_per_node=4 ")


@pytest.mark.parametrize("env, message", [
    ({"NNODES": "2"}, "NNODES=2 needs RDZV_ENDPOINT=host:port"),
    ({"NNODES": "two"}, "NNODES must be a positive integer"),
    ({"NNODES": "2", "RDZV_ENDPOINT": "node0"}, "RDZV_ENDPOINT must be host:port"),
    ({"NNODES": "2", "RDZV_ENDPOINT": "node0:29500", "NODE_RANK": "2"}, "NODE_RANK must be an integer in [0, NNODES=2)"),
])
def test_train_sh_bad_multinode_env_is_one_line_error(env, message):
    proc = dry_run("scripts/train.sh", **env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("tst-titan: error: ") and message in proc.stderr
    assert proc.stderr.count("\n") == 1


@pytest.mark.parametrize("nodelist, node, head, is_host", [
    ("gpu[07-08]", "1", "gpu07", "0"),
    ("gpu[07-08]", "0", "gpu07", "1"),
    ("a-12,b-3", "1", "a-12", "0"),
    ("n[003,005-006],m1", "2", "n003", "0"),
])
def test_slurm_dry_run_prints_the_torchrun_command(nodelist, node, head, is_host):
    # PATH without scontrol: the script expands the node list itself
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "scontrol").exists())
    proc = dry_run("scripts/multinode.slurm", "--training.steps", "1000", PATH=path, SLURM_JOB_NODELIST=nodelist,
                   SLURM_NNODES="3", SLURM_NODEID=node, SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == (
        f"torchrun --nnodes=3 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint={head}:29500 "
        f"--rdzv_id=4242 --rdzv_conf=is_host={is_host} --local-ranks-filter 0 --role rank --tee 3 "
        "-m tst_titan.train --job.config_file train_configs/tst_debug_cpu.toml --training.steps 1000")


def test_slurm_dry_run_uses_scontrol_when_there(tmp_path):
    fake = tmp_path / "scontrol"  # stands in for SLURM's own list expansion
    fake.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames weird[1-2]" ] && printf "headA\\nheadB\\n"\n')
    fake.chmod(0o755)
    proc = dry_run("scripts/multinode.slurm", PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_JOB_NODELIST="weird[1-2]",
                   SLURM_NNODES="2", SLURM_NODEID="1", SLURM_JOB_ID="7", NGPU="2", RDZV_PORT="29123")
    assert proc.returncode == 0, proc.stderr
    assert "--rdzv_endpoint=headA:29123 --rdzv_id=7 --rdzv_conf=is_host=0" in proc.stdout.splitlines()[-1]


def test_slurm_script_outside_slurm_is_one_line_error():
    proc = dry_run("scripts/multinode.slurm")
    assert proc.returncode == 2
    assert proc.stderr.startswith("tst-titan: error: SLURM_JOB_NODELIST is not set") and proc.stderr.count("\n") == 1
