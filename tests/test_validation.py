"""The validation loss's standard error: per-sequence recording, aggregation over ranks
(checked against numpy), and the logged tag of a real run."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchtitan.components.loss import IGNORE_INDEX, cross_entropy_loss

from conftest import ROOT, free_port, ok, rows, run_train
from tst_titan.validate import _PerSequenceLoss, sequence_standard_error


def _batch(seed: int, b: int = 4, length: int = 9, vocab: int = 13):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(b, length, vocab, generator=g)
    labels = torch.randint(0, vocab, (b, length), generator=g)
    labels[1, :3] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX  # a sequence without valid labels is left out
    return pred, labels


def _naive_se(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1) / np.sqrt(len(x)))


def test_recorder_returns_the_loss_unchanged_and_per_sequence_values():
    pred, labels = _batch(0)
    rec = _PerSequenceLoss(cross_entropy_loss)
    loss = rec(pred, labels)
    assert torch.equal(loss, cross_entropy_loss(pred, labels))  # the reported loss is untouched
    for i in range(len(labels)):
        want = F.cross_entropy(pred[i], labels[i], ignore_index=IGNORE_INDEX, reduction="sum")
        torch.testing.assert_close(rec.sums[i].float(), want, rtol=1e-6, atol=1e-6)
    assert rec.counts[0].tolist() == [9, 6, 0, 9]
    n, se = sequence_standard_error(rec.sums, rec.counts)
    x = np.array([rec.sums[i].item() / c for i, c in enumerate([9, 6, 0, 9]) if c])
    assert n == 3 and se == pytest.approx(_naive_se(x), rel=1e-12)


def test_standard_error_matches_numpy_and_needs_two_sequences():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 200, size=257).astype(np.float64)
    sums = counts * rng.normal(4.0, 0.3, size=257)
    n, se = sequence_standard_error(
        [torch.tensor(v, dtype=torch.float64) for v in sums],
        [torch.tensor(counts[:100]), torch.tensor(counts[100:])],  # any grouping of counts
    )
    assert n == 257 and se == pytest.approx(_naive_se(sums / counts), rel=1e-10)
    n, se = sequence_standard_error([torch.tensor(3.0, dtype=torch.float64)], [torch.tensor([2.0])])
    assert n == 1 and math.isnan(se)


def _two_rank_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("batch",))
    rng = np.random.default_rng(7)
    counts = rng.integers(1, 50, size=10).astype(np.float64)
    sums = counts * rng.normal(3.0, 0.5, size=10)
    t = lambda a: [torch.tensor(v, dtype=torch.float64) for v in a]  # noqa: E731
    # Data parallel: rank r holds sequences 2k + r (unequal shares are fine too).
    mine = np.arange(rank, 10, world)
    dp = sequence_standard_error(t(sums[mine]), [torch.tensor(counts[mine])], dp_mesh=mesh)
    # Context parallel: each rank holds a part of every sequence's sum and count.
    part = (rank + 1) / 3.0
    cp = sequence_standard_error(t(sums * part), [torch.tensor(counts * part)], cp_mesh=mesh)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"dp": dp, "cp": cp, "x": (sums / counts).tolist()}, f)
    torch.distributed.destroy_process_group()


def test_aggregation_over_data_and_context_parallel_ranks(tmp_path):
    torch.multiprocessing.spawn(_two_rank_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    want = _naive_se(np.array(res[0]["x"]))
    for r in res:  # every rank gets the global value
        assert r["dp"][0] == 10 and r["dp"][1] == pytest.approx(want, rel=1e-10)
        assert r["cp"][0] == 10 and r["cp"][1] == pytest.approx(want, rel=1e-10)


@pytest.mark.slow
def test_shipped_config_with_readme_override_logs_the_standard_error(tmp_path):
    """The README's ``--tst.switch_step`` on the shipped TST config (it sets a ratio),
    2 ranks: the switch moves and validation reports its standard error beside the
    loss in metrics.jsonl and TensorBoard."""
    dump = tmp_path / "run"
    proc = ok(run_train(
        dump, "--tst.switch_step", "2", "--training.steps", "4", "--training.local_batch_size", "2",
        "--validation.freq", "4", "--validation.steps", "3", "--validation.local_batch_size", "4",
        "--checkpoint.no-enable", "--metrics.log_freq", "1",
        config=ROOT / "train_configs" / "tst_debug_cpu.toml",
    ))
    assert "steps 1-2" in proc.stdout + proc.stderr  # the plan: phase 1 ends at the CLI's step
    val = [r for r in rows(dump) if "validation_loss" in r]
    assert val and val[-1]["step"] == 4
    for r in val:
        assert 0 < r["validation_loss_se"] < 1 and math.isfinite(r["validation_loss"])
    se = val[0]["validation_loss_se"]
    assert "(24 sequences)" in proc.stdout + proc.stderr  # 2 ranks x 3 steps x 4 sequences
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next(dump.rglob("events.out.tfevents*"))))
    acc.Reload()
    assert "validation_metrics/loss_se" in acc.Tags()["scalars"]
    assert acc.Scalars("validation_metrics/loss_se")[0].value == pytest.approx(se, rel=1e-6)
