"""Export round trip: DCP checkpoint -> Hugging Face directory -> transformers.

The exported model must be the trained network: transformers' logits equal the
torchtitan model's on the same tokens (fp32, max abs difference < 1e-4; measured
~3e-6), greedy generation picks the same tokens, and held-out loss / bits per byte of
the checkpoint and of its export agree.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torchtitan.components.tokenizer import HuggingFaceTokenizer

from conftest import ROOT, TEST_CONFIG, ok, run_train
from tst_titan.export import export_hf, load_checkpoint_model
from tst_titan.model import TSTQwen3
from tst_titan.specs import register_specs, tst_qwen3_flavors

transformers = pytest.importorskip("transformers", reason="pip install -e '.[dev]' installs transformers")

ATOL = 1e-4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """tiny llama3, TST steps 1-4 then next-token 5-8, FSDP over 2 ranks, checkpoints 4 and 8."""
    dump = tmp_path_factory.mktemp("export_run")
    ok(run_train(dump, "--checkpoint.enable", "--checkpoint.interval", "4"))
    return dump


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


def _greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    """Naive greedy decoding with the torchtitan model: full forward per new token."""
    out = ids
    with torch.no_grad():
        for _ in range(n):
            nxt = model(out)[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
    return out[0, ids.shape[1]:].tolist()


def _compare(loaded, hf_dir, text: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    titan_ids = HuggingFaceTokenizer(loaded.tokenizer_dir).encode(text, add_bos=True, add_eos=False)
    assert hf_tok(text)["input_ids"] == titan_ids  # same tokens, BOS included
    ids = torch.tensor([titan_ids])
    with torch.no_grad():
        want, got = loaded.model(ids), hf(ids).logits
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff < ATOL, f"max |logits difference| {diff}"
    gen = hf.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))
    assert gen[0, ids.shape[1]:].tolist() == _greedy(loaded.model, ids, 8)


@pytest.mark.slow
def test_llama3_export_matches_the_torchtitan_model(trained, tmp_path):
    ckpt = trained / "checkpoint" / "step-8"
    out = tmp_path / "hf"
    proc = script("export_hf.py", "--config", str(TEST_CONFIG), "--checkpoint", str(ckpt), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    loaded = load_checkpoint_model(str(TEST_CONFIG), str(ckpt))
    _compare(loaded, out, "def greet(name):\n    return 'hello ' + name\n")


@pytest.mark.slow
def test_superposition_phase_checkpoint_is_refused_unless_forced(trained, tmp_path):
    ckpt = trained / "checkpoint" / "step-4"  # the last phase-1 step
    args = ("--config", str(TEST_CONFIG), "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"))
    proc = script("export_hf.py", *args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "export_hf: error: checkpoint step 4 is in the superposition phase (steps 1-4)"
    )
    assert not (tmp_path / "hf").exists()
    assert script("export_hf.py", *args, "--force").returncode == 0


@pytest.mark.slow
def test_eval_ppl_agrees_between_checkpoint_and_export(trained, tmp_path):
    ckpt = trained / "checkpoint" / "step-8"
    out = tmp_path / "hf"
    assert script("export_hf.py", "--config", str(TEST_CONFIG), "--checkpoint", str(ckpt), "--out", str(out)).returncode == 0
    common = ("--max-tokens", "1500", "--seq-len", "32")
    a = script("eval_ppl.py", "--config", str(TEST_CONFIG), "--checkpoint", str(ckpt), *common,
               "--json", str(tmp_path / "a.json"))
    b = script("eval_ppl.py", "--hf", str(out), *common, "--json", str(tmp_path / "b.json"))
    assert a.returncode == 0 and b.returncode == 0, (a.stderr[-2000:], b.stderr[-2000:])
    ra, rb = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b.json").read_text())
    assert ra["tokens"] == rb["tokens"] >= 1500 and ra["bytes"] == rb["bytes"] > 0
    assert abs(ra["loss"] - rb["loss"]) < 1e-5
    assert 0 < ra["bits_per_byte"] < 8 and ra["perplexity"] == pytest.approx(2.718281828 ** ra["loss"])
    assert "bits/byte" in a.stdout


def test_qwen3_export_matches_the_torchtitan_model(tmp_path):
    """Dense qwen3 (q/k norms, explicit head_dim): a random-weight checkpoint written by DCP."""
    register_specs()
    torch.manual_seed(0)
    model = TSTQwen3(tst_qwen3_flavors["tiny"])
    for p in model.parameters():  # away from the all-ones norms, so q/k norm mapping matters
        torch.nn.init.normal_(p, std=0.05 if p.dim() > 1 else 0.3)
        if p.dim() == 1:
            p.data += 1.0
    ckpt = tmp_path / "checkpoint" / "step-9"
    dcp.save(model.state_dict(), checkpoint_id=str(ckpt))
    loaded = load_checkpoint_model(str(TEST_CONFIG), str(ckpt), ["--model.name", "tst_qwen3"])
    out = export_hf(loaded, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    _compare(loaded, out, "import os\nprint(os.getcwd())\n")
