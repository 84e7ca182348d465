"""Token store: preparation, exact equality with on-the-fly tokenization, refusal of
damaged or foreign stores, dataloader workers, and exact resume across the switch and
an epoch boundary (2 ranks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TEST_CONFIG, losses, ok, resume_copy, run_entry, run_train
from tst_titan.config import Data
from tst_titan.data.loader import (
    CheckpointMismatchError, TSTDataLoader, TSTPackedDataset, build_stream,
)
from tst_titan.data.sources import build_source
from tst_titan.errors import DataError
from tst_titan.data.prepare import prepare_store, source_texts
from tst_titan.data.store import StoreStream, TokenStore
from tst_titan.data.tokenizer import resolve_tokenizer_path
from tst_titan.schedule import TSTPlan


def _write_jsonl(path: Path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["def", "return", "self", "import", "class", "value", "x", "for", "in", "if"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 40)))) + f" # doc {i}" for i in range(n)]
    texts[3] = ""  # an empty document is still BOS + EOS
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


def _prepare(tmp: Path, src: Path, tokenizer, tok_dir, name="store", **kw) -> Path:
    out = tmp / name
    prepare_store(source_texts("local", str(src), "train", Data()), tokenizer, tok_dir, out,
                  log=lambda _m: None, **kw)
    return out


def test_store_tokens_equal_on_the_fly_tokenization(tmp_path, tokenizer, tok_dir):
    texts = _write_jsonl(tmp_path / "d.jsonl", 57)
    store = TokenStore(_prepare(tmp_path, tmp_path / "d.jsonl", tokenizer, tok_dir, docs_per_shard=10))
    assert store.num_documents == 57 and len(store.manifest.shards) == 6
    assert store.dtype == np.uint16  # vocabulary 2048 fits
    for i, t in enumerate(texts):
        assert store.document(i).tolist() == tokenizer.encode(t, add_bos=True, add_eos=True), i
    assert store.num_tokens == sum(len(tokenizer.encode(t, add_bos=True, add_eos=True)) for t in texts)


def test_embedded_store_serves_the_on_the_fly_stream_bit_for_bit(tmp_path, tokenizer, tok_dir):
    """Same documents, same per-epoch order: the packed windows of a store and of
    on-the-fly tokenization are identical, through the switch and past an epoch."""
    out = tmp_path / "emb"
    src = source_texts("embedded", None, "validation", Data())  # small: loops quickly
    prepare_store(src, tokenizer, tok_dir, out, docs_per_shard=50, log=lambda _m: None)
    store = TokenStore(out)
    plan = TSTPlan(bag_size=4, switch_step=5, total_steps=10**6, seq_len=256)
    for rank in range(2):
        stream = StoreStream(store, rank, 2, seed=11, loop=True, shuffle=True)
        text_src = build_source("embedded", None, "validation", rank, 2, Data(shuffle_seed=11), loop=True)
        # build_source keeps validation unshuffled; shuffle it like a training split
        text_src._shuffle = True
        a = iter(TSTPackedDataset(stream, None, plan, samples_per_step=4, batch_size=2))
        b = iter(TSTPackedDataset(text_src, tokenizer, plan, samples_per_step=4, batch_size=2))
        epoch_tokens = stream.rank_tokens_per_epoch()
        served = 0
        while served < 1.5 * epoch_tokens:
            (xa, ya), (xb, yb) = next(a), next(b)
            assert torch.equal(xa["input"], xb["input"]) and torch.equal(ya, yb)
            served += xa["input"].numel()
        assert stream.epoch == 1 and text_src.epoch == 1


def test_stream_windows_tile_the_documents_and_resume(tmp_path, tokenizer, tok_dir):
    _write_jsonl(tmp_path / "d.jsonl", 23)
    store = TokenStore(_prepare(tmp_path, tmp_path / "d.jsonl", tokenizer, tok_dir, docs_per_shard=7))
    s = StoreStream(store, 1, 2, seed=3)
    order0 = np.random.default_rng(3).permutation(23)[1::2]
    order1 = np.random.default_rng(4).permutation(23)[1::2]
    expect = np.concatenate([store.document(int(d)) for d in list(order0) + list(order1)])
    got = np.concatenate([s.take(n) for n in (5, 1, 40, 17, 3)] + [s.take(len(expect) - 66)])
    assert np.array_equal(got, expect)
    t = StoreStream(store, 1, 2, seed=3)
    t.take(46)
    u = StoreStream(store, 1, 2, seed=3)
    u.load_state_dict(t.state_dict())
    assert np.array_equal(u.take(30), expect[46:76])
    finite = StoreStream(store, 1, 2, seed=3, loop=False)
    assert finite.take(len(expect) // 2 + 10**6) is None and finite.position == 0


class _Interrupted:
    """A source that dies inside piece ``die_at`` and counts the pieces it is asked for."""

    def __init__(self, src, die_at=None):
        self.src, self.die_at, self.asked = src, die_at, []
        self.description, self.spec = src.description, None

    def num_pieces(self, d):
        return self.src.num_pieces(d)

    def piece_batches(self, k, d, batch):
        self.asked.append(k)
        for i, texts in enumerate(self.src.piece_batches(k, d, 5)):
            if k == self.die_at and i == 1:
                raise KeyboardInterrupt
            yield texts


def test_interrupted_preparation_resumes_and_a_finished_one_is_a_no_op(tmp_path, tokenizer, tok_dir):
    _write_jsonl(tmp_path / "d.jsonl", 45)
    src = source_texts("local", str(tmp_path / "d.jsonl"), "train", Data())
    out = tmp_path / "s"
    first = _Interrupted(src, die_at=2)  # dies after handing out 25 documents (2.5 shards)
    with pytest.raises(KeyboardInterrupt):
        prepare_store(first, tokenizer, tok_dir, out, docs_per_shard=10, log=lambda _m: None)
    assert first.asked == [0, 1, 2]
    assert not (out / "manifest.json").exists() and (out / "shard-00001.json").exists()
    assert not (out / "shard-00002.json").exists()
    with pytest.raises(DataError, match=r"^training.dataset_path: .* incomplete token store"):
        TokenStore(out)
    mtimes = {f.name: f.stat().st_mtime_ns for f in out.iterdir() if f.stem[-5:] in ("00000", "00001")}
    assert len(mtimes) == 6  # tokens, docs and record of shards 0 and 1
    logs, again = [], _Interrupted(src)
    prepare_store(again, tokenizer, tok_dir, out, docs_per_shard=10, log=logs.append)
    assert "resuming after 2 finished shards" in logs[0]
    assert again.asked == [2, 3, 4]  # finished shards are not redone ...
    assert {f: (out / f).stat().st_mtime_ns for f in mtimes} == mtimes  # ... nor rewritten
    clean = _prepare(tmp_path, tmp_path / "d.jsonl", tokenizer, tok_dir, name="clean", docs_per_shard=10)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())
    for f in clean.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    prepare_store(src, tokenizer, tok_dir, out, docs_per_shard=10, log=logs.append)
    assert "store complete" in logs[-1]
    with pytest.raises(DataError, match="prepared with other arguments"):
        prepare_store(src, tokenizer, tok_dir, out, docs_per_shard=20, log=logs.append)


def test_damaged_or_foreign_store_is_refused(tmp_path, tokenizer, tok_dir):
    _write_jsonl(tmp_path / "d.jsonl", 30)
    out = _prepare(tmp_path, tmp_path / "d.jsonl", tokenizer, tok_dir, docs_per_shard=10)
    store = TokenStore(out)
    store.check_tokenizer(tok_dir)
    other = resolve_tokenizer_path("embedded", 1024)  # another BPE
    with pytest.raises(DataError, match=r"^training.dataset_path: .* made with another tokenizer"):
        store.check_tokenizer(other)
    f = out / "tokens-00001.npy"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(DataError, match=r"damaged token store .*tokens-00001.npy has \d+ bytes"):
        TokenStore(out)
    with pytest.raises(DataError, match="no token store at"):
        TokenStore(tmp_path / "nowhere")


def _batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("kind", ["embedded", "local", "store"])
def test_zero_one_two_workers_serve_the_identical_stream_and_resume(tmp_path, kind, tokenizer, tok_dir):
    """Real worker processes: the same batches with 0, 1 and 2 workers, and a loader
    restored from a mid-stream state continues exactly (same worker count)."""
    _write_jsonl(tmp_path / "d.jsonl", 40)
    path = {"embedded": None, "local": str(tmp_path / "d.jsonl"),
            "store": str(_prepare(tmp_path, tmp_path / "d.jsonl", tokenizer, tok_dir))}[kind]
    plan = TSTPlan(bag_size=3, switch_step=2, total_steps=10**6, seq_len=16)

    def loader(workers):
        src, tok = build_stream(kind, path, "train", 1, 2, tokenizer, Data(), loop=True)
        ds = TSTPackedDataset(src, tok, plan, samples_per_step=4, batch_size=2)
        extra = {"prefetch_factor": 2} if workers else {}
        return TSTDataLoader(ds, dp_rank=1, dp_world_size=2, batch_size=2, num_workers=workers, **extra)

    ref = _batches(loader(0), 12)
    for workers in (1, 2):
        got = _batches(loader(workers), 12)
        for (x, y), (xr, yr) in zip(got, ref):
            assert torch.equal(x["input"], xr["input"]) and torch.equal(y, yr)
        a = loader(workers)
        it = iter(a)
        for _ in range(5):
            next(it)
        state = a.state_dict()
        b = loader(workers)
        b.load_state_dict(state)
        rest = _batches(b, 7)
        for (x, y), (xr, yr) in zip(rest, ref[5:]):
            assert torch.equal(x["input"], xr["input"]) and torch.equal(y, yr)
    c = loader(0)
    with pytest.raises(CheckpointMismatchError, match="num_workers = 2, this run has 0"):
        c.load_state_dict(state)


# -- end to end: torchrun, 2 ranks ------------------------------------------------------
def _trace(dump: Path) -> list[list[str]]:
    return [[json.loads(l)["sha1"] for l in (dump / "data_trace" / f"rank{r}.jsonl").read_text().splitlines()]
            for r in range(2)]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, tokenizer, tok_dir):
    """A store so small that 8 steps of the tiny config read it ~3 times per rank."""
    d = tmp_path_factory.mktemp("tiny_store")
    _write_jsonl(d / "d.jsonl", 24, seed=5)
    return _prepare(d, d / "d.jsonl", tokenizer, tok_dir)


@pytest.mark.slow
def test_store_training_resumes_exactly_across_the_switch_and_epochs(tmp_path, tiny_store):
    """Reference run (0 workers) vs 2 workers vs resumes from step 2 (mid phase 1, after
    an epoch boundary) and step 4 (the switch): identical losses and served batches."""
    args = ("--training.dataset", "store", "--training.dataset_path", str(tiny_store),
            "--checkpoint.enable", "--data.trace")
    ref = tmp_path / "ref"
    ok(run_train(ref, *args))
    per_rank = 4 * 2 * 4 * 33 + 4 * 2 * 33  # stream tokens per rank: 4 phase-1 + 4 phase-2 steps
    assert TokenStore(tiny_store).num_tokens / 2 < per_rank / 2  # more than two epochs
    ref_losses, ref_trace = losses(ref), _trace(ref)
    assert len(ref_losses) == 8 and len(ref_trace[0]) == 8 and ref_trace[0] != ref_trace[1]

    two = tmp_path / "two"
    ok(run_train(two, *args, "--training.dataloader.num_workers", "2"))
    assert _trace(two) == ref_trace and losses(two) == ref_losses

    for step, src in ((2, ref), (4, two)):
        dump = tmp_path / f"resume{step}"
        resume_copy(src, dump, step)
        extra = ("--training.dataloader.num_workers", "2") if src is two else ()
        ok(run_train(dump, *args, *extra))
        got = losses(dump)
        assert {k: got[k] for k in range(step + 1, 9)} == {k: ref_losses[k] for k in range(step + 1, 9)}
        assert [t for t in _trace(dump)] == [t[step:] for t in ref_trace]


def test_store_of_another_tokenizer_and_truncated_store_are_one_line_errors(tmp_path, tiny_store, tok_dir):
    import shutil

    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_store, foreign)
    m = json.loads((foreign / "manifest.json").read_text())
    m["tokenizer_sha256"] = "0" * 64
    (foreign / "manifest.json").write_text(json.dumps(m))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_store, broken)
    f = broken / "tokens-00000.npy"
    f.write_bytes(f.read_bytes()[:-2])
    for store, msg in ((foreign, "made with another tokenizer"), (broken, "damaged token store")):
        proc = run_entry(TEST_CONFIG, "--training.dataset", "store", "--training.dataset_path", str(store))
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("tst-titan: error: training.dataset_path: ") and msg in last, last
        assert str(store) in last


def test_hub_source_with_workers_is_refused(tmp_path):
    proc = run_entry(TEST_CONFIG, "--training.dataset", "hf", "--training.dataset_path", "x/y",
                     "--training.dataloader.num_workers", "2")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tst-titan: error: training.dataloader.num_workers: a streamed hub dataset"), last


@pytest.mark.slow
def test_bench_data_prints_the_feed_ratios():
    import re
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run(
        [sys.executable, "scripts/bench_data.py", "--vocab", "2048", "--seq-len", "64", "--batch", "4",
         "--seconds", "0.3", "--workers", "0", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    rows = re.findall(r"^(on the fly|token store) +workers=(\d): +([\d.]+)M data tokens/s", out, re.M)
    assert len(rows) == 4, out
    assert re.search(r"store, one loader process / 270M phase-1 need: [\d.]+x", out)
    for shape in ("270M", "600M", "3B", "10B-A1B"):
        assert re.search(rf"^  {shape} .*need +[\d.]+M data tokens/s", out, re.M), shape


def test_validation_reads_a_held_out_store_the_same_way_every_pass(tmp_path, tokenizer, tok_dir):
    """[validation] dataset = "store": documents in their stored order (no shuffle), and
    every validation pass serves the same batches."""
    from types import SimpleNamespace

    from tst_titan.data.loader import build_validation_dataloader

    texts = _write_jsonl(tmp_path / "v.jsonl", 30)
    store = _prepare(tmp_path, tmp_path / "v.jsonl", tokenizer, tok_dir)
    from torchtitan.config.job_config import DataLoader as DLCfg

    v = SimpleNamespace(dataset="store", dataset_path=str(store), seq_len=16, steps=3,
                        local_batch_size=2, dataloader=DLCfg())
    cfg = SimpleNamespace(validation=v, data=Data())
    loader = build_validation_dataloader(1, 0, tokenizer, cfg)
    first = [b for _, b in zip(range(3), loader)]
    second = [b for _, b in zip(range(3), loader)]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, second))
    stream = np.concatenate([tokenizer.encode(t, add_bos=True, add_eos=True) for t in texts])
    x0 = first[0][0]["input"][0]
    assert torch.equal(x0, torch.from_numpy(stream[:16]))
