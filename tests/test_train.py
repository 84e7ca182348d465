"""End-to-end runs: real torchrun, 2 gloo processes, FSDP2, DCP checkpoints."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, TEST_CONFIG, losses, ok, resume_copy, rows, run_entry, run_train

CKPT = ("--checkpoint.enable", "--checkpoint.interval", "2")
ACCUM = ("--training.global_batch_size", "8")  # local 2 x dp 2 x 2 accumulation steps


@pytest.fixture(scope="module")
def tst_reference(tmp_path_factory):
    """An uninterrupted TST run: steps 1-4 superposition, 5-8 next-token."""
    dump = tmp_path_factory.mktemp("tst_ref")
    proc = ok(run_train(dump, *CKPT, *ACCUM))
    return dump, proc


@pytest.mark.slow
def test_tst_run_switches_once_and_trains(tst_reference):
    dump, proc = tst_reference
    r = {row["step"]: row for row in rows(dump) if "loss" in row}
    assert sorted(r) == list(range(1, 9))
    assert [r[k]["tst/phase"] for k in range(1, 9)] == [1] * 4 + [2] * 4
    assert [r[k]["tst/bag_size"] for k in range(1, 9)] == [4] * 4 + [1] * 4
    assert all(math.isfinite(r[k]["loss"]) for k in r)
    # data tokens: 4x as many per step in phase 1 (2 ranks x 4 seqs x 32 positions x s)
    seen = [r[k]["n_tokens_seen"] for k in range(1, 9)]
    assert seen[0] == 2 * 4 * 32 * 4 and seen[4] - seen[3] == 2 * 4 * 32
    # phase-1 loss at init is about log(vocab) (multi-hot CE, constant entropy dropped)
    assert abs(r[1]["loss"] - math.log(2048)) < 1.0
    assert "superposition_mce" in " ".join(r[1]) and "next_token_ce" in " ".join(r[5])
    assert proc.stdout.count("TST switch: step 5") + proc.stderr.count("TST switch: step 5") >= 1
    for step in (2, 4, 6, 8):
        assert (dump / "checkpoint" / f"step-{step}" / ".metadata").exists()


# Resume at the switch; tests/test_faults.py kills and resumes at every other point.
@pytest.mark.slow
@pytest.mark.parametrize("resume_step", [4])
def test_resume_reproduces_losses_exactly(tst_reference, tmp_path, resume_step):
    ref_dump, _ = tst_reference
    dump = tmp_path / "resumed"
    resume_copy(ref_dump, dump, resume_step)
    ok(run_train(dump, *CKPT, *ACCUM))
    ref, got = losses(ref_dump), losses(dump)
    assert sorted(got) == list(range(resume_step + 1, 9))
    for step in got:
        assert got[step] == ref[step], f"step {step}: {got[step]!r} != {ref[step]!r}"


def _close(got: dict, ref: dict, rtol: float = 1e-5) -> None:
    for step in got:
        assert abs(got[step] - ref[step]) <= rtol * abs(ref[step]), f"step {step}: {got[step]!r} vs {ref[step]!r}"


FUSED = ("--tst.fused_loss", "--tst.fused_loss_chunk_size", "24")  # 64 positions/microbatch: 3 chunks


@pytest.mark.slow
def test_fused_loss_trains_like_the_unfused_loss(tst_reference, tmp_path):
    """tst.fused_loss across the switch, 2 ranks (FSDP), 2 accumulation steps, validation
    on: the same losses, grad norms and per-slot CEs as the reference to float tolerance."""
    ref_dump, _ = tst_reference
    dump = tmp_path / "fused"
    proc = ok(run_train(dump, *CKPT, *ACCUM, *FUSED, "--validation.enable"))
    assert "tst.fused_loss: output projection + loss in chunks of 24 positions" in proc.stdout + proc.stderr
    got, ref = losses(dump), losses(ref_dump)
    assert sorted(got) == list(range(1, 9))
    _close(got, ref)
    by_step = lambda d: {r["step"]: r for r in rows(d) if "loss" in r}  # noqa: E731
    a, b = by_step(dump), by_step(ref_dump)
    for k in range(1, 9):
        assert a[k]["grad_norm"] == pytest.approx(b[k]["grad_norm"], rel=1e-4)
    for k in range(1, 5):
        for j in range(1, 5):
            assert a[k][f"tst/slot_ce/{j}"] == pytest.approx(b[k][f"tst/slot_ce/{j}"], rel=1e-5)
    val = [r["validation_loss"] for r in rows(dump) if "validation_loss" in r]
    assert len(val) >= 2 and all(math.isfinite(v) for v in val)


@pytest.mark.slow
def test_fused_loss_resumes_from_an_unfused_checkpoint(tst_reference, tmp_path):
    """Same checkpoint keys: a fused run resumed at the switch continues the reference."""
    ref_dump, _ = tst_reference
    dump = tmp_path / "fused_resumed"
    resume_copy(ref_dump, dump, 4)
    ok(run_train(dump, *CKPT, *ACCUM, *FUSED))
    got = losses(dump)
    assert sorted(got) == [5, 6, 7, 8]
    _close(got, losses(ref_dump))


@pytest.mark.slow
def test_changed_data_parallel_degree_is_refused(tst_reference, tmp_path):
    ref_dump, _ = tst_reference
    dump = tmp_path / "one_rank"
    resume_copy(ref_dump, dump, 4)
    proc = run_train(dump, *CKPT, nproc=1)
    assert proc.returncode != 0
    assert "tst-titan: error: checkpoint was written with data-parallel degree 2, this run has 1" in proc.stderr


@pytest.mark.slow
def test_checkpoint_of_another_model_flavor_is_refused(tst_reference, tmp_path):
    ref_dump, _ = tst_reference
    dump = tmp_path / "other_flavor"
    resume_copy(ref_dump, dump, 4)
    proc = run_train(dump, *CKPT, *ACCUM, "--model.flavor", "debug")
    assert proc.returncode != 0
    assert "tst-titan: error: checkpoint" in proc.stderr and "was written for another model (" in proc.stderr
    assert "check model.name / model.flavor" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["data", "metadata"])
def test_damaged_checkpoint_is_refused(tst_reference, tmp_path, damage):
    ref_dump, _ = tst_reference
    dump = tmp_path / "damaged"
    resume_copy(ref_dump, dump, 4)
    folder = dump / "checkpoint" / "step-4"
    victims = list(folder.glob("*.distcp")) if damage == "data" else [folder / ".metadata"]
    for f in victims:
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 3])
    proc = run_train(dump, *CKPT, *ACCUM)
    assert proc.returncode != 0
    assert f"tst-titan: error: checkpoint {folder}" in proc.stderr, proc.stderr[-3000:]
    assert "delete the folder to resume from an earlier one" in proc.stderr
    assert "step: 5" not in proc.stdout + proc.stderr  # refused before any step ran


@pytest.mark.slow
def test_bag_size_one_is_plain_training_bit_for_bit(tmp_path):
    plain, tst1 = tmp_path / "plain", tmp_path / "tst1"
    ok(run_train(plain, "--tst.no-enable", "--training.steps", "6"))
    ok(run_train(tst1, "--tst.bag_size", "1", "--tst.switch_step", "3", "--training.steps", "6"))
    a, b = losses(plain), losses(tst1)
    assert len(a) == 6 and a == b, (a, b)
    assert [r["tst/phase"] for r in rows(tst1) if "loss" in r][:3] == [1, 1, 1]


@pytest.mark.slow
def test_baseline_run_falls_and_leaves_tensorboard_and_checkpoints(tmp_path):
    dump = tmp_path / "base"
    proc = ok(run_train(
        dump, "--tst.no-enable", "--training.steps", "12", "--metrics.enable_tensorboard",
        "--validation.enable", "--validation.freq", "6", "--checkpoint.enable",
        "--checkpoint.interval", "6", "--optimizer.lr", "1e-2",
    ))
    l = losses(dump)
    assert all(math.isfinite(v) for v in l.values())
    assert sum(l[k] for k in (10, 11, 12)) < sum(l[k] for k in (1, 2, 3)) - 1.0, l
    val = [r["validation_loss"] for r in rows(dump) if "validation_loss" in r]
    assert len(val) == 3 and val[-1] < val[0]
    assert list((dump / "tb").rglob("events.out.tfevents*"))
    assert (dump / "checkpoint" / "step-12" / ".metadata").exists()
    # torchtitan's 2 s end-of-training sleep is skipped (tst_titan.device.skip_final_sleep)
    log = proc.stdout + proc.stderr
    stamps = [re.search(r"(\d\d):(\d\d):(\d\d),(\d{3})", line) for line in log.splitlines()
              if "Sleeping 2 seconds" in line or "Training completed" in line]
    secs = [int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000 for h, m, s, ms in (x.groups() for x in stamps)]
    assert len(secs) == 2 and secs[1] - secs[0] < 0.5, log[-2000:]


@pytest.mark.parametrize(
    "override,key",
    [
        (("--tst.bag_size", "0"), "tst.bag_size"),
        (("--tst.switch_step", "8"), "tst.switch_step"),
        (("--tst.superposition_ratio", "0.3", "--tst.switch_step", "4"), "tst.switch_step"),  # both given
        (("--model.flavor", "nope"), "model.flavor"),
        (("--training.dataset", "local", "--training.dataset_path", "/nonexistent/x.jsonl"), "training.dataset_path"),
        (("--training.dataset", "c4"), "training.dataset"),
        (("--model.hf_assets_path", "/nonexistent"), "model.hf_assets_path"),
        (("--parallelism.pipeline_parallel_degree", "2"), "parallelism.pipeline_parallel_degree"),
        (("--data.embedded_vocab_size", "4096"), "data.embedded_vocab_size"),
    ],
)
def test_bad_config_is_one_line_error_naming_the_key(override, key):
    proc = run_entry(TEST_CONFIG, *override)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tst-titan: error: {key}"), last


def test_ratio_out_of_range(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(TEST_CONFIG.read_text().replace("switch_step = 4", "superposition_ratio = 1.0"))
    proc = run_entry(cfg)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("tst-titan: error: tst.superposition_ratio")


def test_unknown_tst_key_is_refused(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(TEST_CONFIG.read_text().replace("bag_size = 4", "bag_sise = 4"))
    proc = run_entry(cfg)
    assert proc.returncode != 0 and "bag_sise" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["input_only", "output_only"])
def test_ablation_modes_train_through_the_switch(tmp_path, mode):
    dump = tmp_path / mode
    ok(run_train(dump, "--tst.mode", mode, "--training.steps", "6", "--tst.switch_step", "3"))
    r = [row for row in rows(dump) if "loss" in row]
    assert [x["tst/phase"] for x in r] == [1, 1, 1, 2, 2, 2]
    assert all(math.isfinite(x["loss"]) for x in r)
    per_step = 2 * 2 * 32  # ranks x local batch x positions
    seen = [x["n_tokens_seen"] for x in r]
    # input_only reads s tokens per position in phase 1; output_only reads one
    assert seen[0] == per_step * (4 if mode == "input_only" else 1)
    # output_only logs the multi-hot loss in phase 1, input_only a next-token loss
    assert ("loss_metrics/superposition_mce" in r[0]) == (mode == "output_only")


@pytest.mark.slow
def test_reset_optimizer_rewarms_the_learning_rate(tmp_path):
    cont, reset = tmp_path / "cont", tmp_path / "reset"
    common = ("--training.steps", "6", "--tst.switch_step", "3", "--lr_scheduler.warmup_steps", "2")
    ok(run_train(cont, *common))
    ok(run_train(reset, *common, "--tst.at_switch", "reset_optimizer"))
    lc = {x["step"]: x["lr"] for x in rows(cont) if "lr" in x}
    lr = {x["step"]: x["lr"] for x in rows(reset) if "lr" in x}
    assert [lr[k] for k in (1, 2, 3)] == [lc[k] for k in (1, 2, 3)]
    assert lr[4] == pytest.approx(0.5 * lc[4]) and lr[5] == pytest.approx(lc[5])
    assert losses(cont)[4] == losses(reset)[4]  # same weights before the switch update
    assert losses(cont)[5] != losses(reset)[5]  # fresh AdamW moments change that update


@pytest.mark.slow
def test_strict_data_budget_refuses_a_run_that_would_repeat_data(tmp_path):
    proc = run_train(tmp_path / "budget", "--training.steps", "100000", "--tst.switch_step", "30000",
                     "--data.strict_budget", nproc=1)
    assert proc.returncode != 0
    assert "tst-titan: error: training.dataset: the run reads about" in proc.stderr
    assert "data will repeat (data.strict_budget = true)" in proc.stderr


@pytest.mark.slow
def test_qwen3_trains_through_the_switch(tmp_path):
    """tst_qwen3 (dense). Its MoE flavors cannot run on CPU: torchtitan 0.2.2's router
    counts tokens with torch.histc on int64, which has no CPU kernel."""
    dump = tmp_path / "qwen3"
    ok(run_train(dump, "--model.name", "tst_qwen3", "--model.flavor", "tiny",
                 "--training.steps", "6", "--tst.switch_step", "3"))
    r = [row for row in rows(dump) if "loss" in row]
    assert [x["tst/phase"] for x in r] == [1, 1, 1, 2, 2, 2]
    assert all(math.isfinite(x["loss"]) for x in r) and r[-1]["loss"] < r[0]["loss"]
