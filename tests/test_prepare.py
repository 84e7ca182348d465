"""Token store preparation at scale, offline: the token cap, a held-out store carved by
hash (disjoint from the training store), worker processes (the store of 2 processes is
the store of 1, byte for byte), parts on several machines merged into one manifest, a
killed preparation resumed without redoing a shard; and the registry of data sources
that the loader, the preparation and the checks share."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from tst_titan.checks import _check_dataset
from tst_titan.config import Data
from tst_titan.data.prepare import Holdout, is_held_out, merge_parts, prepare_store, source_texts
from tst_titan.data.sources import DATASET_KINDS
from tst_titan.data.store import TokenStore
from tst_titan.errors import ConfigError, DataError

WORDS = ["def", "return", "self", "import", "class", "value", "x", "for", "in", "if", "while", "yield"]


def _texts(n: int, seed: int, dup_every: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 60)))) + f" # {seed}-{i}" for i in range(n)]
    if dup_every:  # exact copies of earlier documents: they must land on one side of a holdout
        for i in range(dup_every, n, dup_every):
            out[i] = out[i - dup_every]
    return out


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _hub_dir(root: Path, files: int, docs: int, dup_every: int = 0) -> tuple[Path, list[str]]:
    """A dataset directory that ``datasets.load_dataset`` streams file by file, as it does a
    hub repository: ``--source hf --path <dir>`` exercises the hub code offline."""
    texts = []
    for f in range(files):
        t = _texts(docs, seed=100 + f, dup_every=dup_every)
        _jsonl(root / "data" / f"part-{f:03d}.jsonl", t)
        texts += t
    return root, texts


def _prepare(src, tokenizer, tok_dir, out, **kw):
    kw.setdefault("log", lambda _m: None)
    return prepare_store(src, tokenizer, tok_dir, out, **kw)


def _docs(store_dir) -> list[tuple[int, ...]]:
    s = TokenStore(store_dir)
    return [tuple(s.document(i).tolist()) for i in range(s.num_documents)]


def _enc(tokenizer, text) -> tuple[int, ...]:
    return tuple(tokenizer.encode(text, add_bos=True, add_eos=True))


def _same_files(a: Path, b: Path, skip=lambda name: False) -> None:
    names = sorted(p.name for p in a.iterdir() if not skip(p.name))
    assert names == sorted(p.name for p in b.iterdir() if not skip(p.name))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# -- the cap ------------------------------------------------------------------------------------
def test_cap_keeps_the_first_documents_up_to_the_one_reaching_it(tmp_path, tokenizer, tok_dir):
    texts = _texts(60, seed=1)
    src = source_texts("local", str(_jsonl(tmp_path / "d.jsonl", texts)), "train", Data())
    lengths = np.array([len(_enc(tokenizer, t)) for t in texts])
    cap = int(lengths[:23].sum()) - 3  # reached inside document 22 (in piece 2 of 10 documents)
    m = _prepare(src, tokenizer, tok_dir, tmp_path / "s", docs_per_shard=10, max_tokens=cap)
    assert m.num_documents == 23 and m.num_tokens == lengths[:23].sum() >= cap
    assert [s["documents"] for s in m.shards] == [10, 10, 3]  # later pieces never tokenized
    assert _docs(tmp_path / "s") == [_enc(tokenizer, t) for t in texts[:23]]
    assert sorted(p.name for p in (tmp_path / "s").glob("shard-*")) == [f"shard-0000{k}.json" for k in range(3)]
    # two parts: pieces 0, 2, 4 and 1, 3, 5, each part holding half the cap
    m2 = _prepare(src, tokenizer, tok_dir, tmp_path / "s2", docs_per_shard=10, max_tokens=cap, num_parts=2)
    for j in range(2):
        part = json.loads((tmp_path / "s2" / f"part-0000{j}-of-00002.json").read_text())
        share = cap // 2 + (j < cap % 2)
        assert share <= part["tokens"] < share + lengths.max()
        assert part["pieces"] == list(range(j, 2 * len(part["pieces"]), 2))
    assert m2.num_tokens == sum(s["tokens"] for s in m2.shards) >= cap
    with pytest.raises(DataError, match="prepared with other arguments"):
        _prepare(src, tokenizer, tok_dir, tmp_path / "s", docs_per_shard=10, max_tokens=cap + 1)


def test_token_count_option_takes_suffixes():
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "scripts" / "prepare_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert [script.token_count(t) for t in ("110B", "50M", "1e9", "1_000", "2.5K")] == [
        110 * 10**9, 50 * 10**6, 10**9, 1000, 2500]
    assert script.TEXT_KINDS == ["embedded", "python_env", "local", "hf"]  # python_env is in --source's help
    args = script.parse_args(["--source", "python_env", "--packages", "torch", "--out", "x"])
    assert args.source == "python_env" and args.packages == ["torch"]


# -- the held-out store -------------------------------------------------------------------------
def test_holdout_stores_are_disjoint_and_cover_the_source(tmp_path, tokenizer, tok_dir):
    root, texts = _hub_dir(tmp_path / "hub", files=4, docs=120, dup_every=7)
    src = source_texts("hf", str(root), "train", Data())
    _prepare(src, tokenizer, tok_dir, tmp_path / "train", holdout=Holdout(8, "train"))
    _prepare(src, tokenizer, tok_dir, tmp_path / "val", holdout=Holdout(8, "validation"))
    train, val = _docs(tmp_path / "train"), _docs(tmp_path / "val")
    assert not set(train) & set(val)  # no document (token sequence) in both stores
    assert sorted(train + val) == sorted(_enc(tokenizer, t) for t in texts)  # together: the source
    assert val == [_enc(tokenizer, t) for t in texts if is_held_out(t, 8)]  # in source order
    assert 0.06 < len(val) / len(texts) < 0.2
    m = TokenStore(tmp_path / "val").manifest
    assert m.source["holdout_every"] == 8 and m.source["split"] == "validation" and m.docs_per_shard == 0
    assert len(m.shards) == 4  # one shard per file of the (hub) dataset
    # a capped held-out store is a prefix of the uncapped one: still disjoint from train
    _prepare(src, tokenizer, tok_dir, tmp_path / "val_cap", holdout=Holdout(8, "validation"), max_tokens=500)
    capped = _docs(tmp_path / "val_cap")
    assert capped == val[: len(capped)] and sum(map(len, capped)) >= 500 > sum(map(len, capped[:-1]))


# -- processes ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_write_the_store_of_one_byte_for_byte(tmp_path, tokenizer, tok_dir):
    """Real worker processes, with a cap that falls inside a piece and a holdout: the
    workers tokenize ahead (pieces past the cap are dropped, the piece reaching it is cut
    by the parent), the one-process run stops exactly; the files are identical."""
    texts = _texts(400, seed=3)
    src = source_texts("local", str(_jsonl(tmp_path / "d.jsonl", texts)), "train", Data())
    kept = [t for t in texts if not is_held_out(t, 5)]
    cap = int(sum(len(_enc(tokenizer, t)) for t in kept[:130])) - 7  # inside piece 2 of 50 documents
    kw = dict(docs_per_shard=50, batch_docs=16, max_tokens=cap, holdout=Holdout(5, "train"))
    one = _prepare(src, tokenizer, tok_dir, tmp_path / "one", processes=1, **kw)
    two = _prepare(src, tokenizer, tok_dir, tmp_path / "two", processes=2, **kw)
    assert one.num_documents == 130 and one == two
    _same_files(tmp_path / "one", tmp_path / "two")
    assert _docs(tmp_path / "two") == [_enc(tokenizer, t) for t in kept[:130]]


# -- parts on several machines ----------------------------------------------------------------
def test_parts_merged_are_the_one_run_store(tmp_path, tokenizer, tok_dir):
    """Without a cap, K parts merged == one run with K = 1, byte for byte (manifest
    included). With a cap, K parts merged == one run with the same K (the cap is split over
    the parts, so K = 1 keeps other documents near each part's end)."""
    texts = _texts(230, seed=4)
    src = source_texts("local", str(_jsonl(tmp_path / "d.jsonl", texts)), "train", Data())
    whole = tmp_path / "whole"
    _prepare(src, tokenizer, tok_dir, whole, docs_per_shard=20)
    parts = tmp_path / "parts"
    assert _prepare(src, tokenizer, tok_dir, parts, docs_per_shard=20, num_parts=3, part=2) is None
    with pytest.raises(DataError, match=r"^--merge: parts \[0, 1\] of 3 .* are not finished"):
        merge_parts(parts, 3)
    assert _prepare(src, tokenizer, tok_dir, parts, docs_per_shard=20, num_parts=3, part=0) is None
    logs = []
    m = _prepare(src, tokenizer, tok_dir, parts, docs_per_shard=20, num_parts=3, part=1, log=logs.append)
    assert m is not None and (parts / "manifest.json").exists()  # the last part merges
    _same_files(whole, parts, skip=lambda name: name.startswith("part-"))
    assert merge_parts(parts, 3, log=lambda _m: None) == m  # an explicit merge: the same manifest

    cap = 1500
    one_run = tmp_path / "one_run"
    _prepare(src, tokenizer, tok_dir, one_run, docs_per_shard=20, max_tokens=cap, num_parts=2)
    split = tmp_path / "split"
    for j in (1, 0):
        _prepare(src, tokenizer, tok_dir, split, docs_per_shard=20, max_tokens=cap, num_parts=2, part=j)
    _same_files(one_run, split)
    with pytest.raises(DataError, match="prepared in 2 parts"):
        merge_parts(split, 3)


@pytest.mark.slow
def test_killed_preparation_resumes_without_redoing_a_shard(tmp_path, tokenizer, tok_dir):
    """prepare_data.py with 2 worker processes on a 'hub' dataset of 10 files, killed (the
    process group, SIGKILL) once two shards are finished; the rerun streams only the
    other files (finished shards keep their files and mtimes), and the store equals an
    uninterrupted preparation."""
    root, _ = _hub_dir(tmp_path / "hub", files=10, docs=2500)
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "--source", "hf", "--path", str(root),
           "--tokenizer", "embedded", "--out", str(out), "--processes", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while len(list(out.glob("shard-*.json"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if (out / "manifest.json").exists():
        pytest.fail("the preparation finished before it could be killed; make the corpus larger")
    finished = sorted(out.glob("shard-*.json"))
    assert 2 <= len(finished) < 10, proc.stdout.read().decode()[-2000:]
    stems = [p.stem.split("-")[1] for p in finished]
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix in (".npy", ".json")
              and p.stem.split("-")[-1] in stems}
    assert len(mtimes) == 3 * len(finished)
    done_tokens = sum(json.loads(p.read_text())["tokens"] for p in finished)

    logs = []
    src = source_texts("hf", str(root), "train", Data())
    m = _prepare(src, tokenizer, tok_dir, out, log=logs.append)
    assert f"resuming after {len(finished)} finished shards" in logs[0]
    assert f"tokenized {m.num_tokens - done_tokens:,} tokens" in logs[1]  # only the other files
    assert {name: (out / name).stat().st_mtime_ns for name in mtimes} == mtimes
    clean = tmp_path / "clean"
    _prepare(src, tokenizer, tok_dir, clean)
    _same_files(out, clean)
    assert len(m.shards) == 10 and m.docs_per_shard == 0


# -- the registry -------------------------------------------------------------------------------
def test_the_checks_ask_the_registry(tmp_path):
    assert DATASET_KINDS == ("embedded", "python_env", "local", "hf", "store")
    with pytest.raises(ConfigError, match=r"^validation.dataset: unknown dataset 'c4'; use one of \['embedded', "
                                          r"'python_env', 'local', 'hf', 'store'\]"):
        _check_dataset("c4", None, "validation")
    for kind in ("local", "hf", "store"):
        with pytest.raises(ConfigError, match=rf"^training.dataset_path: required when training.dataset = '{kind}'"):
            _check_dataset(kind, None, "training")
    with pytest.raises(ConfigError, match=r"^training.dataset_path: .*nowhere.jsonl' does not exist"):
        _check_dataset("local", str(tmp_path / "nowhere.jsonl"), "training")
    with pytest.raises(ConfigError, match=r"^training.dataset_path: no installed package directory 'no_such_pkg'"):
        _check_dataset("python_env", "torch,no_such_pkg", "training")
    _check_dataset("python_env", "torch", "training")  # stdlib + torch: fine
    _check_dataset("embedded", None, "training")
    with pytest.raises(DataError, match=r"^--source: 'store' is already tokenized"):
        source_texts("store", str(tmp_path), "train", Data())
