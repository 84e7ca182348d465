"""Kill anywhere, resume with the same command, lose nothing.

One TST job (2 gloo ranks, FSDP2, 2 gradient-accumulation steps, a checkpoint every
step; steps 1-4 superposition, 5-8 next-token) is SIGKILLed, process tree and all, at
four places in turn and restarted each time with the identical command:

  after step 3 (in phase 1, one step before the switch), after step 4 (at the switch),
  after step 5 (right after it), while checkpoint step-7 is being written (phase 2).

The stitched run must equal an uninterrupted one bit for bit: every step's loss and
every step's served batch (``data.trace`` digests, both ranks). The half-written
checkpoint must be skipped (the restart loads step-6), never loaded as if complete.
The pause points come from tests/helpers/fault_entry.py (test-only).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, kill_tree, loaded_step, losses, ok, run_train, train_cmd, train_env

HELPERS = ROOT / "tests" / "helpers"
ARGS = (
    "--checkpoint.enable", "--checkpoint.interval", "1",
    "--training.global_batch_size", "8",  # local 2 x dp 2 x 2 accumulation steps
    "--data.trace",
)


def run_until_pause(dump: Path, log: Path, **pause: int) -> str:
    """Start the job; once rank 0 reaches the pause point, SIGKILL everything. Returns the log."""
    marker = dump.parent / f"{dump.name}.paused"
    marker.unlink(missing_ok=True)
    env = train_env(
        PYTHONPATH=os.pathsep.join([str(HELPERS), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        FAULT_MARKER=str(marker), **{f"FAULT_PAUSE_{k.upper()}": str(v) for k, v in pause.items()},
    )
    cmd = train_cmd(dump, *ARGS, module="fault_entry")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"job ended (rc={proc.returncode}) before pause {pause}:\n{log.read_text()[-6000:]}")
            if time.monotonic() > deadline:
                kill_tree(proc)
                pytest.fail(f"pause {pause} not reached:\n{log.read_text()[-6000:]}")
            time.sleep(0.1)
        kill_tree(proc)
    return log.read_text()


def trace(dump: Path) -> dict[tuple[int, int], str]:
    """(rank, step) -> digest of the batch served; a replayed step keeps its last digest."""
    out = {}
    for rank in (0, 1):
        for line in (dump / "data_trace" / f"rank{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            out[(rank, row["step"])] = row["sha1"]
    return out


@pytest.mark.slow
def test_sigkill_anywhere_then_same_command_resumes_exactly(tmp_path):
    ref = tmp_path / "ref"
    ok(run_train(ref, *ARGS))

    dump = tmp_path / "job"
    kills = [  # (pause point, checkpoint the restart after this kill must load)
        ({"after_save": 3}, 3),
        ({"after_save": 4}, 4),
        ({"after_save": 5}, 5),
        ({"in_save": 7}, 6),  # step-7 half written: skipped
    ]
    expect_load = None
    for i, (pause, next_load) in enumerate(kills):
        log = run_until_pause(dump, tmp_path / f"kill{i}.log", **pause)
        assert loaded_step(log) == expect_load, (pause, log[-4000:])
        expect_load = next_load
        if "in_save" in pause:
            partial = dump / "checkpoint" / "step-7"
            assert partial.is_dir() and any(partial.iterdir()), "data files of step-7 were written"
            assert not (partial / ".metadata").exists()
    final = ok(run_train(dump, *ARGS))
    assert loaded_step(final.stdout + final.stderr) == 6  # not the half-written step 7

    want, got = losses(ref), losses(dump)  # metrics.jsonl: the last row of a step wins
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == want[step], f"step {step}: {got[step]!r} != {want[step]!r}"
    t_ref, t_got = trace(ref), trace(dump)
    assert sorted(t_got) == sorted(t_ref) and len(t_ref) == 16
    assert t_got == t_ref, [k for k in t_ref if t_got.get(k) != t_ref[k]]
