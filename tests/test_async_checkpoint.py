"""Asynchronous checkpointing (``checkpoint.async_mode = "async"``) with TST, on CPU.

The paper-shape configs save asynchronously: torchtitan 0.2.2 calls
``dcp.async_save`` on a gloo group of its own, which first stages (deep-copies) the
state into fresh CPU storage in the training thread, then writes it from a background
thread while training goes on. The risk is a checkpoint that holds a mix of the saved
step and later updates, or a save cut short at exit. The test: 2 gloo ranks, tiny
config, steps 1-4 superposition and 5-8 next-token, an async checkpoint every 2 steps;
a run resumed from step-2 crosses the switch and must give the uninterrupted run's
losses bit for bit, and both runs must end with identical weights.

``async_with_pinned_mem`` cannot run on CPU: torch's ``DefaultStager`` with
non-blocking copies (the stager torchtitan builds for that mode) raises
``AssertionError: Non-blocking copy requires that the current accelerator is
available.`` It is checked on a GPU by ``scripts/gpu_check.sh`` (row "async checkpoint").
"""

from __future__ import annotations

import pytest

from pathlib import Path

import torch

from conftest import losses, ok, resume_copy, run_train

ASYNC = ("--checkpoint.enable", "--checkpoint.interval", "2", "--checkpoint.async_mode", "async")


def _tensors(step_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint (model and optimizer state), by flattened key."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{step_dir.parent.parent.name}-{step_dir.name}.pt"
    dcp_to_torch_save(step_dir, out)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    walk("", torch.load(out, weights_only=False))
    return flat


@pytest.mark.slow
def test_async_checkpoint_resume_across_the_switch_is_exact(tmp_path):
    ref = tmp_path / "ref"
    proc = ok(run_train(ref, *ASYNC))
    log = proc.stdout + proc.stderr
    assert "staging if async is enabled" in log
    for step in (2, 4, 6, 8):  # every async save completed (DCP writes .metadata last)
        assert (ref / "checkpoint" / f"step-{step}" / ".metadata").exists(), step

    resumed = tmp_path / "resumed"
    resume_copy(ref, resumed, 2)  # a crash after step 2: the resumed run crosses the switch
    ok(run_train(resumed, *ASYNC))
    want, got = losses(ref), losses(resumed)
    assert sorted(want) == list(range(1, 9)) and sorted(got) == list(range(3, 9))
    for step in got:
        assert got[step] == want[step], f"step {step}: {got[step]!r} != {want[step]!r}"

    a = _tensors(ref / "checkpoint" / "step-8", tmp_path)
    b = _tensors(resumed / "checkpoint" / "step-8", tmp_path)
    assert "tok_embeddings.weight" in a and any(k.startswith("optimizer.") for k in a)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
