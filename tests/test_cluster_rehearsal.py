"""The walk of docs/CLUSTER.md on CPU, at toy scale, through the same scripts.

A local parquet corpus is prepared as the guide prepares DCLM: a capped training store made
by 2 parts (the SLURM array tasks) and a merge, and a held-out store carved with the same
``--holdout-every``. A TST run and its baseline twin then train on 2 "nodes" each (two
``scripts/train.sh`` launches with ``NNODES=2`` and a c10d rendezvous on localhost), across
the switch, validating on the held-out store and checkpointing; the memory plan is made for
the same config meanwhile; ``scripts/compare_runs.py`` reads the two runs.

The scripts' ``main`` run in this process where they only read and write files (a fresh
interpreter costs ~10 s of imports each, most of this test's budget); training runs as
real processes, as on a cluster.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import subprocess
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest

from conftest import ROOT, TEST_CONFIG, free_port, losses, rows, train_env, wait_all
from tst_titan.data.store import TokenStore

CAP = 6000  # --max-tokens of the training store: about a quarter of its side of the corpus
HOLDOUT_EVERY = 5
STEPS, SWITCH, BAG = 8, 4, 4  # tests/assets/tiny_cpu.toml: superposition steps 1-4, then next-token
BATCH, SEQ, RANKS = 2, 32, 2  # local batch, sequence length, 2 nodes x 1 process


def script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_corpus(folder: Path, docs: int = 400) -> list[str]:
    """Short English-like documents in two parquet files (a ``text`` column, as DCLM)."""
    rng = random.Random(0)
    words = ("the a model token bag loss step data shard node rank gradient layer train store "
             "cluster memory plan switch phase batch").split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(10, 40))) + f" ({i})." for i in range(docs)]
    folder.mkdir()
    half = docs // 2
    pd.DataFrame({"text": texts[:half]}).to_parquet(folder / "part-0.parquet")
    pd.DataFrame({"text": texts[half:]}).to_parquet(folder / "part-1.parquet")
    return texts


def store_documents(store: TokenStore) -> set[tuple[int, ...]]:
    return {tuple(store.document(d).tolist()) for d in range(store.num_documents)}


def launch_two_nodes(dump: Path, logs: Path, *overrides: str) -> list[subprocess.Popen]:
    """The guide's by-hand launch: the same ``scripts/train.sh`` command on node 0 and node 1."""
    port, procs = free_port(), []
    for node in (0, 1):
        env = train_env(NNODES="2", NGPU="1", NODE_RANK=str(node), RDZV_ENDPOINT=f"localhost:{port}",
                        RDZV_ID=dump.name, CONFIG_FILE=str(TEST_CONFIG))
        with open(logs / f"{dump.name}-node{node}.log", "w") as log:
            procs.append(subprocess.Popen(["bash", "scripts/train.sh", "--job.dump_folder", str(dump), *overrides],
                                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


@pytest.mark.slow
def test_cluster_walk_rehearsed_on_cpu(tmp_path):
    texts = write_corpus(tmp_path / "corpus")
    train_dir, val_dir = tmp_path / "data" / "train", tmp_path / "data" / "val"

    # 2. Prepare the data: two array tasks, then the merge; the held-out store
    prepare = script("prepare_data")
    source = ["--source", "local", "--path", str(tmp_path / "corpus"), "--tokenizer", "embedded",
              "--holdout-every", str(HOLDOUT_EVERY), "--docs-per-shard", "50", "--processes", "1"]
    for shard in (0, 1):
        assert prepare.main([*source, "--split", "train", "--max-tokens", str(CAP), "--out", str(train_dir),
                             "--num-shards", "2", "--shard", str(shard)]) == 0
    assert prepare.main(["--merge", "--num-shards", "2", "--out", str(train_dir)]) == 0
    assert prepare.main([*source, "--split", "validation", "--out", str(val_dir)]) == 0

    train, val = TokenStore(train_dir), TokenStore(val_dir)
    longest = int(train.doc_lengths.max())
    assert train.manifest.num_parts == 2 and train.manifest.max_tokens == CAP
    # each part stops after the document that reaches its half of the cap
    assert CAP <= train.num_tokens < CAP + 2 * longest
    train_docs, val_docs = store_documents(train), store_documents(val)
    assert len(train_docs) == train.num_documents and len(val_docs) == val.num_documents  # texts are unique
    assert not train_docs & val_docs, "a held-out document is in the training store"
    assert 0.1 < val.num_documents / len(texts) < 0.3  # about 1 in HOLDOUT_EVERY
    assert train.num_documents + val.num_documents < len(texts)  # the cap dropped training documents

    # 5. Launch: the TST run and its baseline twin, 2 nodes each
    common = ["--training.dataset", "store", "--training.dataset_path", str(train_dir),
              "--validation.enable", "--validation.dataset", "store", "--validation.dataset_path", str(val_dir),
              "--metrics.enable_tensorboard", "--checkpoint.enable", "--checkpoint.interval", "4"]
    runs = {"tst": tmp_path / "outputs" / "tst", "baseline": tmp_path / "outputs" / "baseline"}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = launch_two_nodes(runs["tst"], logs, *common)
    procs += launch_two_nodes(runs["baseline"], logs, *common, "--tst.no-enable")

    # 3. The memory plan of the same config, while they train
    plan_json = tmp_path / "plan.json"
    try:
        assert script("plan_memory").main(["--config", str(TEST_CONFIG), "--ngpu", str(RANKS),
                                           "--json", str(plan_json)]) == 0
    finally:
        wait_all(procs, logs)
    plan = json.loads(plan_json.read_text())
    assert sorted((p["phase"], p["fused_loss"]) for p in plan) == [(1, False), (1, True), (2, False), (2, True)]
    for p in plan:
        assert p["input_shape"] == ([BATCH, SEQ, BAG] if p["phase"] == 1 else [BATCH, SEQ])
        assert p["ngpu"] == RANKS and p["peak_bytes"] > p["steady_bytes"] > 0
    log0 = (logs / "tst-node0.log").read_text()
    n_params = int(re.search(r"size: ([\d,]+) total parameters", log0).group(1).replace(",", ""))
    assert {p["n_params"] for p in plan} == {n_params}, "the plan's model is the one that trained"

    # what the two runs did: every step, the switch, held-out validation, checkpoints
    assert "TST switch: step 5" in log0
    assert "TST switch" not in (logs / "baseline-node0.log").read_text()
    positions = RANKS * BATCH * SEQ  # per step, over the 2 nodes
    want_tokens = {"tst": positions * (BAG * SWITCH + STEPS - SWITCH), "baseline": positions * STEPS}
    final_val = {}
    for name, dump in runs.items():
        assert sorted(losses(dump)) == list(range(1, STEPS + 1))
        train_rows = [r for r in rows(dump) if "loss" in r]
        assert train_rows[-1]["n_tokens_seen"] == want_tokens[name]
        val_rows = [r for r in rows(dump) if "validation_loss" in r]
        assert [r["step"] for r in val_rows][-2:] == [4, 8]
        final_val[name] = val_rows[-1]["validation_loss"]
        for step in (4, 8):
            assert (dump / "checkpoint" / f"step-{step}" / ".metadata").is_file()

    # 7. Compare
    out = tmp_path / "comparison"
    assert script("compare_runs").main([str(runs["baseline"]), str(runs["tst"]), "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    assert md.startswith("Baseline: **baseline**")
    table = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in md.splitlines() if line.startswith("| ")}
    for name in runs:
        tst_col, final_step, final_loss = (c.strip() for c in table[name][:3])
        assert tst_col == ("off" if name == "baseline" else f"s={BAG}, switch after {SWITCH}")
        assert final_step == str(STEPS) and final_loss == f"{final_val[name]:.4f}"
        assert table[name][-1].strip() == f"{want_tokens[name]:,}"
    assert (out / "compare.png").stat().st_size > 0
