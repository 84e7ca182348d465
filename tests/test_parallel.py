"""TST under torchtitan's parallelisms, both phases and across the switch (CPU, gloo).

Every layout starts from the same seed checkpoint (model weights written by one
process), so runs with the same data-parallel degree see the same data and the same
initial weights and their losses can be compared step by step.

With ``TST_SHARED_GPU=1`` on a CUDA machine (what ``scripts/gpu_check.sh`` sets), the
multi-process layouts run as processes sharing GPU 0 over gloo
(``python -m tst_titan.gpucheck.launch``): the same checks on one GPU.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT, free_port, losses, ok, rows, run_train, train_cmd, train_env

STEPS = ("--training.steps", "6", "--tst.switch_step", "3")  # 3 superposition + 3 next-token
# Ranks share GPU 0 over gloo (tst_titan.gpucheck.launch): the GPU check's mode.
SHARED_GPU = os.environ.get("TST_SHARED_GPU") == "1" and torch.cuda.is_available()
BF16 = ("--training.mixed_precision_param", "bfloat16")
# Clip below the tiny model's grad norms (0.45-0.8 on 2 ranks) so DDP vs FSDP exercises
# clipping, where a gradient-scale difference would show (AdamW alone hides it).
CLIP = ("--training.max_norm", "0.5")


def _train(dump, *overrides: str, nproc: int, env: dict | None = None) -> subprocess.CompletedProcess:
    if not (SHARED_GPU and nproc > 1):
        return run_train(dump, *overrides, nproc=nproc, env=env)
    return subprocess.run(
        train_cmd(dump, *overrides, nproc=nproc, module="tst_titan.gpucheck.launch"), cwd=ROOT,
        env=train_env(**(env or {})), capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def seed_ckpt(tmp_path_factory):
    dump = tmp_path_factory.mktemp("seed")
    ok(run_train(dump, "--checkpoint.enable", "--checkpoint.create_seed_checkpoint", nproc=1))
    assert (dump / "checkpoint" / "step-0" / ".metadata").exists()
    return dump / "checkpoint" / "step-0"


@pytest.fixture(scope="module")
def layout_run(seed_ckpt, tmp_path_factory):
    cache: dict[str, dict[int, float]] = {}

    def run(name: str, nproc: int, *overrides: str, env: dict | None = None):
        if name not in cache:
            dump = tmp_path_factory.mktemp(name)
            shutil.copytree(seed_ckpt, dump / "checkpoint" / "step-0")
            proc = ok(_train(dump, *STEPS, "--checkpoint.enable", "--checkpoint.interval", "100",
                             *overrides, nproc=nproc, env=env))
            got = losses(dump)
            assert sorted(got) == list(range(1, 7))
            assert [r["tst/phase"] for r in rows(dump) if "loss" in r] == [1, 1, 1, 2, 2, 2]
            cache[name] = got
            cache[name + ":log"] = proc.stdout + proc.stderr
            cache[name + ":dump"] = dump
        return cache[name]

    run.cache = cache
    return run


def close(a: dict[int, float], b: dict[int, float], tol: float) -> None:
    for k in a:
        assert abs(a[k] - b[k]) <= tol, f"step {k}: {a[k]} vs {b[k]} (tol {tol})"


@pytest.mark.slow
def test_tensor_parallel_with_loss_parallel_matches_single_process(layout_run):
    single = layout_run("single", 1)
    tp = layout_run("tp2", 2, "--parallelism.tensor_parallel_degree", "2",
                    "--parallelism.data_parallel_shard_degree", "1")
    close(tp, single, 1e-4)


@pytest.mark.slow
def test_tensor_parallel_resume_is_exact(layout_run, tmp_path):
    """Save under TP=2 at step 4 (just after the switch), resume under TP=2: same losses."""
    tp_args = ("--parallelism.tensor_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1")
    ref = layout_run("tp2ckpt", 2, *tp_args, "--checkpoint.interval", "2")
    src = layout_run.cache["tp2ckpt:dump"]
    dump = tmp_path / "tp_resumed"
    shutil.copytree(src / "checkpoint" / "step-4", dump / "checkpoint" / "step-4")
    ok(_train(dump, *STEPS, "--checkpoint.enable", "--checkpoint.interval", "2", *tp_args, nproc=2))
    got = losses(dump)
    assert sorted(got) == [5, 6] and all(got[k] == ref[k] for k in got), (got, ref)


@pytest.mark.slow
def test_ddp_matches_fsdp(layout_run):
    fsdp = layout_run("fsdp2", 2, *CLIP)
    ddp = layout_run("ddp2", 2, "--parallelism.data_parallel_replicate_degree", "2",
                     "--parallelism.data_parallel_shard_degree", "1", *CLIP)
    close(ddp, fsdp, 1e-5)
    # DDP sums gradients like FSDP (tst_titan.parallelize): torchtitan 0.2.2's DDP alone
    # averages them, giving exactly half FSDP's grad norm and different clipping.
    def norms(name):
        return [r["grad_norm"] for r in rows(layout_run.cache[name + ":dump"]) if "loss" in r]

    assert norms("ddp2") == pytest.approx(norms("fsdp2"), rel=1e-4)
    assert max(norms("fsdp2")) > 0.5 > min(norms("fsdp2"))  # clipped in some steps, not all


@pytest.mark.slow
def test_hsdp_matches_fsdp_on_four_ranks(layout_run):
    fsdp4 = layout_run("fsdp4", 4)
    hsdp = layout_run("hsdp2x2", 4, "--parallelism.data_parallel_replicate_degree", "2",
                      "--parallelism.data_parallel_shard_degree", "2")
    close(hsdp, fsdp4, 1e-3)


@pytest.mark.slow
def test_compile_matches_eager(layout_run):
    single = layout_run("single", 1)
    compiled = layout_run("compile", 1, "--compile.enable", "--compile.components", "model",
                          "--compile.components", "loss")
    log = layout_run.cache["compile:log"]
    assert "Compiling the TST loss with torch.compile" in log and "torch.compile" in log
    close(compiled, single, 1e-4)


def test_dynamo_compiles_once_per_phase_never_per_step():
    """Blocks compiled like torchtitan's apply_compile (fullgraph, per block), TST loss
    compiled: no new frame within a phase, at most two at the switch."""
    from torch._dynamo.utils import counters

    from tst_titan.loss import TSTLoss
    from tst_titan.model import TSTLlama3
    from tst_titan.specs import tst_llama3_flavors

    torch._dynamo.reset()
    counters.clear()
    args = dataclasses.replace(tst_llama3_flavors["tiny"], max_seq_len=64)
    torch.manual_seed(0)
    model = TSTLlama3(args)
    with torch.no_grad():
        model.init_weights()
    for name, block in model.layers.named_children():
        model.layers.register_module(name, torch.compile(block, fullgraph=True))
    loss_fn = TSTLoss(torch.full((4,), 0.25), compile_fn=torch.compile)
    frames = []
    for step in range(1, 7):
        shape = (2, 16, 4) if step <= 3 else (2, 16)
        x, y = torch.randint(0, 2048, shape), torch.randint(0, 2048, shape)
        loss_fn(model(x), y).backward()
        frames.append(counters["frames"]["ok"])
    assert frames[0] >= 1, frames
    assert frames[0] == frames[1] == frames[2] and frames[3] == frames[4] == frames[5], frames
    assert frames[3] - frames[2] <= 2, frames
    torch._dynamo.reset()


@pytest.mark.slow
def test_float8_emulated_trains_close_to_fsdp(layout_run):
    pytest.importorskip("torchao", reason="float8 needs torchao (pip install '.[float8]')")
    fsdp = layout_run("fsdp2", 2, *CLIP)
    f8 = layout_run("float8", 2, "--model.converters", "quantize.linear.float8",
                    "--quantize.linear.float8.emulate", *CLIP)
    assert "Float8" in layout_run.cache["float8:log"]
    close(f8, fsdp, 0.05)


def _cp_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from tst_titan.trainer import shard_bags_for_context_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    B, L, s = 2, 16, 3
    stream = torch.arange(B * s * (L + 1)).view(B, s * (L + 1))
    inputs = stream[:, : s * L].reshape(B, L, s)
    labels = stream[:, s:].reshape(B, L, s)
    x, y, pos = shard_bags_for_context_parallel(inputs, labels, mesh, "headtail")
    torch.save({"x": x, "y": y, "pos": pos, "inputs": inputs, "labels": labels}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_context_parallel_shards_whole_bags_and_their_labels(tmp_path):
    """The data side of CP (the attention side needs CUDA SDPA and runs on GPU only)."""
    mp.spawn(_cp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    seen = []
    for r in range(2):
        d = torch.load(tmp_path / f"{r}.pt")
        pos = d["pos"][0].long()
        assert d["x"].shape == (2, 8, 3) and d["y"].shape == (2, 8, 3)
        assert torch.equal(d["x"], d["inputs"][:, pos]) and torch.equal(d["y"], d["labels"][:, pos])
        # a label row is still the bag after its input row, at every position of the shard
        assert torch.equal(d["y"][:, :, 0], d["x"][:, :, 0] + 3)
        seen += pos.tolist()
    assert sorted(seen) == list(range(16))
    assert seen[:4] == [0, 1, 2, 3] and seen[4:8] == [12, 13, 14, 15]  # head-tail balancing


@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.device_count() < 2 and not SHARED_GPU,
    reason="context-parallel training needs CUDA (2 GPUs, or TST_SHARED_GPU=1 on one): on "
    "CPU, torchtitan 0.2.2's CP fails for plain training too "
    "(aten._scaled_dot_product_flash_attention_for_cpu has no CP sharding rule; flex "
    "attention has no CPU backward)",
)
def test_context_parallel_training_matches_single_process(layout_run):
    """bf16, like real CP runs: torch's CP shards SDPA through the cuDNN / flash kernels
    (torchtitan's SDPA wrapper allows cuDNN, flash and math); in fp32 neither kernel
    applies and the wrapper falls back to math, which CP cannot shard. Both runs compute
    in bf16: CP through FSDP's bf16 parameters (torchtitan wraps the model over
    dp_shard x cp), the single process through torchtitan's AMP."""
    single = layout_run("single_bf16", 1, *BF16)
    cp = layout_run("cp2", 2, "--parallelism.context_parallel_degree", "2",
                    "--parallelism.data_parallel_shard_degree", "1", *BF16)
    assert "Applied Context Parallel to the model" in layout_run.cache["cp2:log"]
    close(cp, single, 2e-2)  # bf16 rounding in different places, and CP reorders attention

    def norms(name):
        return [r["grad_norm"] for r in rows(layout_run.cache[name + ":dump"]) if "loss" in r]

    assert norms("cp2") == pytest.approx(norms("single_bf16"), rel=5e-2)
