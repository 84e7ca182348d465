"""Packing, the continuous stream across the switch, and exact dataloader resume."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from tst_titan.config import Data
from tst_titan.data import embedded
from tst_titan.data.loader import TSTPackedDataset
from tst_titan.errors import CheckpointMismatchError
from tst_titan.data.readers import MapStyleSource
from tst_titan.data.sources import build_source
from tst_titan.errors import DataError
from tst_titan.data.tokenizer import build_tokenizer
from tst_titan.schedule import Phase, TSTPlan


class CharTokenizer:
    """ord() of each character, bos=1, eos=2: makes streams easy to reason about."""

    bos_id, eos_id = 1, 2

    def encode(self, text, add_bos=True, add_eos=True):
        return [1] * add_bos + [ord(c) for c in text] + [2] * add_eos


def _docs(n=40):
    return [f"document {i}: " + "abcdefghij"[: 3 + i % 7] * (1 + i % 5) for i in range(n)]


def _stream(docs, order, tok):
    out = []
    for i in order:
        out += tok.encode(docs[i])
    return out


def _source(docs, rank=0, world=1, loop=True):
    return MapStyleSource(lambda i: docs[i], len(docs), rank, world, seed=7, loop=loop)


@pytest.mark.parametrize("mode", ["full", "input_only", "output_only"])
def test_split_window_shapes_and_alignment(mode):
    plan = TSTPlan(bag_size=3, switch_step=1, total_steps=2, seq_len=4, mode=mode)
    w = torch.arange(plan.window_len(Phase.SUPERPOSITION))
    x, y = plan.split_window(w, Phase.SUPERPOSITION)
    if mode == "full":
        assert x.tolist()[1] == [3, 4, 5] and y.tolist()[0] == [3, 4, 5] and y.shape == (4, 3)
        assert w.numel() == 3 * 5
    elif mode == "input_only":
        assert x.shape == (4, 3) and y.tolist() == [3, 6, 9, 12]
    else:
        assert x.tolist() == [0, 1, 2, 3] and y.tolist()[0] == [1, 2, 3] and y.tolist()[3] == [4, 5, 6]
    x2, y2 = plan.split_window(torch.arange(5), Phase.NEXT_TOKEN)
    assert x2.tolist() == [0, 1, 2, 3] and y2.tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 3)])
def test_served_windows_concatenate_to_the_stream_across_the_switch(world, accum):
    docs, tok = _docs(), CharTokenizer()
    local_bs, L, s, switch = 2, 8, 4, 3
    plan = TSTPlan(bag_size=s, switch_step=switch, total_steps=8, seq_len=L)
    for rank in range(world):
        src = _source(docs, rank, world)
        ds = TSTPackedDataset(src, tok, plan, samples_per_step=local_bs * accum)
        served, it = [], iter(ds)
        for step in range(1, 9):
            for _ in range(local_bs * accum):
                x, y = next(it)
                x = x["input"]
                phase = plan.phase(step)
                if phase == Phase.SUPERPOSITION:
                    assert x.shape == (L, s) and y.shape == (L, s)
                    assert torch.equal(y[:-1], x[1:])  # label row i is bag i+1
                    window = torch.cat([x.flatten(), y[-1]])
                else:
                    assert x.shape == (L,) and torch.equal(y[:-1], x[1:])
                    window = torch.cat([x, y[-1:]])
                served += window.tolist()
        expect = _stream(docs, src._rank_order(0) + src._rank_order(1), tok)[: len(served)]
        assert served == expect, f"rank {rank}: stream differs"
        n1 = switch * local_bs * accum * s * (L + 1)
        n2 = (8 - switch) * local_bs * accum * (L + 1)
        assert len(served) == n1 + n2


def test_ranks_read_disjoint_documents():
    docs = _docs(41)
    seen = [set(_source(docs, r, 3)._rank_order(0)) for r in range(3)]
    assert set.union(*seen) == set(range(41)) and sum(map(len, seen)) == 41


@pytest.mark.parametrize("stop_after", [5, 12, 13, 30])  # samples: mid phase 1, at, after switch
def test_resume_continues_the_exact_stream(stop_after):
    docs, tok = _docs(), CharTokenizer()
    plan = TSTPlan(bag_size=4, switch_step=3, total_steps=10, seq_len=8)
    ref = TSTPackedDataset(_source(docs), tok, plan, samples_per_step=4)
    ref_items = [next(it) for it in [iter(ref)] for _ in range(40)]

    a = TSTPackedDataset(_source(docs), tok, plan, samples_per_step=4)
    it = iter(a)
    for _ in range(stop_after):
        next(it)
    state = pickle.loads(pickle.dumps(a.state_dict()))
    b = TSTPackedDataset(_source(docs), tok, plan, samples_per_step=4)
    b.load_state_dict(state)
    it_b = iter(b)
    for k in range(stop_after, 40):
        x, y = next(it_b)
        assert torch.equal(x["input"], ref_items[k][0]["input"]) and torch.equal(y, ref_items[k][1])


def test_resume_after_the_source_loops():
    docs, tok = _docs(5), CharTokenizer()
    plan = TSTPlan(bag_size=2, switch_step=2, total_steps=100, seq_len=16)
    ref = iter(TSTPackedDataset(_source(docs), tok, plan, samples_per_step=2))
    ref_items = [next(ref) for _ in range(60)]
    a = TSTPackedDataset(_source(docs), tok, plan, samples_per_step=2)
    it = iter(a)
    for _ in range(45):
        next(it)
    assert a._source.epoch >= 2
    b = TSTPackedDataset(_source(docs), tok, plan, samples_per_step=2)
    b.load_state_dict(a.state_dict())
    it_b = iter(b)
    for k in range(45, 60):
        assert torch.equal(next(it_b)[1], ref_items[k][1])


def test_checkpoint_from_another_bag_size_is_refused():
    docs, tok = _docs(), CharTokenizer()
    a = TSTPackedDataset(_source(docs), tok, TSTPlan(4, 3, 10, 8), samples_per_step=4)
    next(iter(a))
    b = TSTPackedDataset(_source(docs), tok, TSTPlan(6, 3, 10, 8), samples_per_step=4)
    with pytest.raises(CheckpointMismatchError, match="bag_size: checkpoint 4 vs config 6"):
        b.load_state_dict(a.state_dict())


def test_embedded_corpus_splits_are_disjoint_and_nonempty():
    train, val = embedded.document_paths("train"), embedded.document_paths("validation")
    assert len(train) > 100 and len(val) > 5 and not set(train) & set(val)
    assert "def " in embedded.read_document(train[0]) or len(embedded.read_document(train[0])) > 0


def test_embedded_documents_are_chunks_that_tile_their_files():
    docs = embedded.documents("train")
    by_file: dict[str, list[tuple[int, int]]] = {}
    for path, a, b in docs:
        by_file.setdefault(path, []).append((a, b))
    assert sorted(by_file) == sorted(embedded.document_paths("train"))
    for path, bounds in by_file.items():  # chunks tile every file exactly, in order
        text = embedded.read_document(path)
        assert bounds[0][0] == 0 and bounds[-1][1] == len(text)
        assert all(x[1] == y[0] for x, y in zip(bounds, bounds[1:]))
    assert "".join(embedded.read_chunk(d) for d in docs[:50]) == "".join(
        embedded.read_document(p) for p in dict.fromkeys(d[0] for d in docs[:50])
    )[: sum(b - a for _, a, b in docs[:50])]
    sizes = sorted(b - a for _, a, b in docs)
    # no giant documents: the largest chunk is a few times the target, not a whole module
    assert len(docs) > 4 * len(by_file) and sizes[-1] < 5 * embedded.CHUNK_CHARS


def test_chunk_bounds_cut_after_blank_lines():
    text = ("x" * 10 + "\n\n") * 5 + "tail"
    bounds = embedded.chunk_bounds(text, target=20)
    assert [text[a:b] for a, b in bounds][0] == ("x" * 10 + "\n\n") * 2
    assert "".join(text[a:b] for a, b in bounds) == text
    one_line_blocks = "\n".join(["y" * 30] * 10)  # no blank line: cut at a line end
    bounds = embedded.chunk_bounds(one_line_blocks, target=40)
    assert all(one_line_blocks[b - 1] == "\n" for _, b in bounds[:-1]) and len(bounds) > 1
    assert embedded.chunk_bounds("") == [(0, 0)]


def test_embedded_tokenizer_round_trips(tmp_path, monkeypatch):
    class Cfg:
        class model:
            hf_assets_path = "embedded"

        data = Data(embedded_vocab_size=512)

    monkeypatch.setenv("TST_TITAN_CACHE", str(tmp_path))
    tok = build_tokenizer(Cfg)
    text = "def f(x):\n    return x + 1  # ü\n"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids[1:-1]) == text and tok.get_vocab_size() == 512
    # cached: a second build reads the same files
    assert build_tokenizer(Cfg).get_vocab_size() == 512


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "txt"])
def test_local_files(tmp_path, fmt):
    texts = [f"local document number {i}" for i in range(6)]
    if fmt == "jsonl":
        p = tmp_path / "d.jsonl"
        p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = tmp_path / "d.parquet"
        pq.write_table(pa.table({"text": texts}), p)
    else:
        p = tmp_path / "d.txt"
        p.write_text("\n\n".join(texts) + "\n")
    src = build_source("local", str(p), "train", 0, 1, Data(), loop=False)
    got = sorted(t.strip() for t in src)
    assert got == sorted(texts)


def test_local_errors_name_the_key(tmp_path):
    with pytest.raises(DataError, match=r"^training.dataset_path: .* does not exist"):
        build_source("local", str(tmp_path / "nope.jsonl"), "train", 0, 1, Data(), loop=True)
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(DataError, match="unsupported file type"):
        build_source("local", str(tmp_path / "x.csv"), "train", 0, 1, Data(), loop=True)
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="data.text_field"):
        build_source("local", str(p), "train", 0, 1, Data(), loop=True)


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_non_utf8_local_text_is_refused_naming_file_and_byte(tmp_path, fmt):
    good = tmp_path / f"a_good.{fmt}"
    bad = tmp_path / f"b_bad.{fmt}"
    if fmt == "txt":
        good.write_text("fine text\n\nmore\n")
        bad.write_bytes(b"hello\n\nw\xffrld\n")  # 0xff never occurs in UTF-8
        offset = 8
    else:
        good.write_text(json.dumps({"text": "fine"}) + "\n")
        bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')  # latin-1 e-acute
        offset = 28
    with pytest.raises(DataError) as err:
        build_source("local", str(tmp_path), "train", 0, 1, Data(), loop=True)
    msg = str(err.value)
    assert msg.startswith("training.dataset_path: ") and "not valid UTF-8" in msg
    assert f"{bad} (byte {offset})" in msg, msg


@pytest.mark.parametrize("name", ["e.jsonl", "e.txt"])
def test_empty_dataset_is_refused(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError, match=r"^training.dataset_path: .* holds no documents"):
        build_source("local", str(tmp_path / name), "train", 0, 1, Data(), loop=True)


def test_tiny_datasets(tmp_path):
    p = tmp_path / "one.jsonl"
    p.write_text(json.dumps({"text": "only one"}) + "\n")
    with pytest.raises(DataError, match="1 documents, fewer than the 2 data-parallel ranks"):
        build_source("local", str(p), "train", 0, 2, Data(), loop=True)
    # Two documents, one null: the null is an empty document, and a looping source
    # keeps serving windows far longer than the data (the budget check warns about it).
    p.write_text(json.dumps({"text": "ab"}) + "\n" + json.dumps({"text": None}) + "\n")
    src = build_source("local", str(p), "train", 0, 1, Data(), loop=True)
    plan = TSTPlan(bag_size=4, switch_step=2, total_steps=4, seq_len=8)
    ds = TSTPackedDataset(src, CharTokenizer(), plan, samples_per_step=1)
    windows = [next(iter_) for iter_ in [iter(ds)] for _ in range(4)]
    assert [tuple(w[0]["input"].shape) for w in windows] == [(8, 4), (8, 4), (8,), (8,)]
    flat = torch.cat([w[0]["input"].flatten() for w in windows]).tolist()
    assert set(flat) <= {1, 2, ord("a"), ord("b")}


def test_data_budget_counts_phases_and_estimates_epochs():
    from tst_titan.data.budget import consumed_tokens_per_rank, plan_budget

    plan = TSTPlan(bag_size=4, switch_step=3, total_steps=10, seq_len=8)
    assert consumed_tokens_per_rank(plan, 2) == 3 * 2 * 4 * 9 + 7 * 2 * 9
    docs, tok = ["x" * 98] * 10, CharTokenizer()  # 100 tokens each with bos/eos
    budget = plan_budget(_source(docs, 0, 2), tok, plan, samples_per_step=2)
    assert budget.available_tokens == 500  # 5 documents on rank 0 of 2
    assert budget.epochs == pytest.approx(342 / 500)
    assert (budget.phase1_tokens, budget.phase2_tokens) == (3 * 2 * 4 * 9, 7 * 2 * 9)
    assert "phase 1: 216, phase 2: 126" in budget.describe()
    assert "0.68 epochs" in budget.describe()
