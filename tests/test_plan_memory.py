"""The per-GPU memory plan (tst_titan.memory_plan) against hand counts and measurements.

- Sharded state: the plan's parameter, gradient and AdamW bytes equal a hand count of the
  tiny flavor's parameters x 4 bytes x (1 + 1 + 2) / ranks.
- Step memory: the fake-tensor estimate of a step (peak over the steady state, mostly
  activations here) against the same step on REAL tensors in 2 gloo ranks, measured by
  the CPU allocator's events in torch.profiler (not by the tracker the plan uses).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, TEST_CONFIG, free_port, ok, train_env
from tst_titan.memory_check import check_measured_peak, markdown_table
from tst_titan.memory_plan import estimate_memory
from tst_titan.memory_step import load_job_config

SCRIPT = ROOT / "scripts" / "plan_memory.py"

# A step whose memory is mostly activations: bf16 mixed precision, op-level selective AC
# (the paper configs' settings), 8 x 256 positions, 2 microbatches per step.
ACT_OVERRIDES = [
    "--training.local_batch_size", "8", "--training.global_batch_size", "32", "--training.seq_len", "256",
    "--training.mixed_precision_param", "bfloat16",
    "--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op",
]
STEP_FACTOR = 1.05  # measured / estimated step memory must lie in [1 / 1.05, 1.05]


def tiny_param_count() -> int:
    """Hand count of the ``tiny`` llama3 flavor (dim 64, 2 layers, 4 heads, vocab 2048)."""
    dim, layers, vocab = 64, 2, 2048
    ffn = 256  # llama3: int(2 * 4 * dim / 3) = 170, rounded up to multiple_of = 256
    attention = 4 * dim * dim  # wq, wk, wv, wo (4 kv heads of 16: wk, wv are dim x dim)
    feed_forward = 3 * dim * ffn  # w1, w2, w3
    norms = 2 * dim
    return layers * (attention + feed_forward + norms) + 2 * vocab * dim + dim  # + embed, output, norm


@pytest.mark.parametrize("ngpu", [2, 4])
def test_sharded_state_equals_hand_count(ngpu):
    n = tiny_param_count()
    e = estimate_memory(load_job_config(TEST_CONFIG), ngpu, 1)
    assert e.n_params == n == 393536
    assert e.state_bytes == {"params": n * 4 // ngpu, "grads": n * 4 // ngpu, "optimizer": n * 8 // ngpu}
    assert sum(e.state_bytes.values()) == n * 4 * (1 + 1 + 2) // ngpu
    # the tracker's own figures at the peak: fp32 shards, and AdamW's two fp32 moments
    # plus fused AdamW's on-device step counters (one fp32 scalar per parameter tensor)
    n_tensors = 2 * 9 + 3
    assert e.breakdown["params"] == n * 4 // ngpu
    assert e.breakdown["optimizer"] == n * 8 // ngpu + 4 * n_tensors
    table = markdown_table([("tiny", e)])
    assert "| tiny | %d | 1 | off | 2x32x4 |" % ngpu in table and table.count("yes") == 2


@pytest.mark.slow
def test_step_memory_matches_a_measured_two_rank_run():
    """Estimate vs measure, phases 1 and 2, fused_loss off and on (FSDP2 over 2 ranks)."""
    common = ["--config", str(TEST_CONFIG), "--phase", "1", "--phase", "2", "--fused", "both"]
    measured = ok(subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
         f"--rdzv_endpoint=localhost:{free_port()}", str(SCRIPT), "--measure", *common, "--", *ACT_OVERRIDES],
        cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=600))
    rows = json.loads(measured.stdout.strip().splitlines()[-1])
    assert [(r["phase"], r["fused_loss"], r["world_size"]) for r in rows] == [
        (1, False, 2), (1, True, 2), (2, False, 2), (2, True, 2)]
    for r in rows:
        e = estimate_memory(load_job_config(TEST_CONFIG, ACT_OVERRIDES), 2, r["phase"],
                            fused_loss=r["fused_loss"])
        assert e.microbatches == 2
        act = e.breakdown.get("activations", 0) + e.breakdown.get("temporaries", 0)
        assert act > 0.9 * e.step_bytes, "the step should be mostly activations here"
        ratio = r["step_bytes"] / e.step_bytes
        assert 1 / STEP_FACTOR <= ratio <= STEP_FACTOR, (r, e.step_bytes, ratio)


def test_check_measured_peak_api():
    """What a GPU check can call: ok inside the band, not outside it."""
    est = estimate_memory(load_job_config(TEST_CONFIG), 2, 2).peak_gib
    good = check_measured_peak(str(TEST_CONFIG), [], 2, 2, measured_gib=est / 1.1)
    assert good["ok"] and good["estimate_over_measured"] == pytest.approx(1.1, abs=1e-3)
    assert good["estimate_gib"] == round(est, 2)
    assert not check_measured_peak(str(TEST_CONFIG), [], 2, 2, measured_gib=2 * est)["ok"]


def test_phase_one_of_a_baseline_config_is_a_one_line_error():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", str(ROOT / "train_configs" / "llama3_270m.toml"),
                           "--phase", "1"], cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "tst-titan: error: phase 1: the config has tst.enable = false (no superposition phase)")
