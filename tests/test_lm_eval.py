"""Downstream evaluation with lm-evaluation-harness, offline, on a tiny trained run.

The tasks are the ones shipped in tst_titan/lm_eval_tasks (YAML + jsonl, no hub):
``tst_heldout`` (held-out chunks of the embedded corpus, rolling log-likelihood) and
``tst_tiny_mc`` (eight multiple-choice questions). Claims:

1. ``scripts/eval_lm.py`` takes a DCP checkpoint through the export and lm-eval and
   writes ``<run>/lm_eval/results.json``.
2. lm-eval's numbers are the model's: each document's rolling log-likelihood and each
   answer's log-likelihood equal a naive computation with transformers written here
   (BOS once before the first window and before every multiple-choice context).
3. lm-eval's bits per byte on the held-out documents agrees with
   ``scripts/eval_ppl.py``'s (run on the DCP checkpoint) within ``TOL_BPB``. What
   differs, and nothing else (the test rebuilds both numbers naively from the export):
   - EOS: eval_ppl scores ``[BOS] text [EOS]``, one more predicted token per document;
     lm-eval scores the text alone.
   - Windowing: both predict ``seq_len`` tokens per window from at most ``seq_len``
     tokens of context, the first window starting at BOS; eval_ppl's last window starts
     where the one before ended (short context), lm-eval's ends at the document's end
     with a full window of context.
   - Bytes: both count the UTF-8 bytes of the same text (ASCII here), so they agree.
   On this tiny model the difference is ~0.003 bits/byte, almost all of it EOS.
4. A task whose data would need the unreachable hub stops the script with one line
   that names the task, exit status 2, before any export or model load.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TEST_CONFIG, ok, run_train

pytest.importorskip("lm_eval", reason="pip install -e '.[dev]' installs lm-eval")
transformers = pytest.importorskip("transformers")

from tst_titan import lm_eval as tl  # noqa: E402 - needs lm-eval, skipped above without it
from tst_titan.analysis.compare import downstream_section  # noqa: E402
from tst_titan.errors import EvalError  # noqa: E402

SEQ_LEN = 32  # tests/assets/tiny_cpu.toml's training.seq_len: eval_lm's max_length and eval_ppl's window
TOL_BPB = 0.01  # |lm-eval - eval_ppl| bits per byte (measured 0.0034 on the 8-step run)
HELDOUT = ROOT / "tst_titan" / "lm_eval_tasks" / "tst_heldout.jsonl"


def _script(name: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / name), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """tiny llama3, TST steps 1-4 then next-token 5-8 (one process); then eval_lm.py on the
    local tasks and eval_ppl.py on the held-out documents, side by side."""
    run = tmp_path_factory.mktemp("lm_eval_run")
    ok(run_train(run, "--checkpoint.enable", "--checkpoint.interval", "8", nproc=1))
    ckpt = str(run / "checkpoint" / "step-8")
    lm = _script("eval_lm.py", "--config", str(TEST_CONFIG), "--checkpoint", ckpt, "--tasks", "local")
    ppl = _script("eval_ppl.py", "--config", str(TEST_CONFIG), "--checkpoint", ckpt, "--seq-len", str(SEQ_LEN),
                  "--max-tokens", str(10**9), "--json", str(run / "eval_ppl.json"), "--",
                  "--validation.dataset", "local", "--validation.dataset_path", str(HELDOUT))
    lm_proc, ppl_proc = _wait(lm), _wait(ppl)
    assert lm_proc.returncode == 0, lm_proc.stderr[-3000:]
    assert ppl_proc.returncode == 0, ppl_proc.stderr[-3000:]
    return run


def _windows_lm_eval(ids: list[int], bos: int, L: int) -> list[tuple[list[int], int]]:
    """lm-eval's rolling windows over [BOS] + ids, as (tokens, number of scored last tokens)."""
    seq, n = [bos, *ids], len(ids)
    out = [(seq[: min(L, n) + 1], min(L, n))]
    done = min(L, n)
    while done < n:
        m = min(n - done, L)
        end = done + m  # the last scored token is seq[end]
        out.append((seq[end - L : end + 1], m))
        done = end
    return out


def _windows_eval_ppl(ids: list[int], bos: int, eos: int, L: int) -> list[tuple[list[int], int]]:
    """tst_titan.evaluate's windows over [BOS] + ids + [EOS]: consecutive, non-overlapping."""
    seq = [bos, *ids, eos]
    return [(seq[s : s + L + 1], len(seq[s : s + L + 1]) - 1) for s in range(0, len(seq) - 1, L)]


@torch.no_grad()
def _loglik(model, windows: list[tuple[list[int], int]]) -> float:
    total = 0.0
    for tokens, n in windows:
        ids = torch.tensor([tokens])
        logp = torch.log_softmax(model(ids[:, :-1]).logits.float(), -1)[0, -n:]
        total += logp.gather(-1, ids[0, -n:, None]).sum().item()
    return total


@pytest.mark.slow  # trains a run (torchrun, one process)
def test_eval_lm_script_writes_results_that_agree_with_eval_ppl(evaluated):
    results = json.loads((evaluated / "lm_eval" / "results.json").read_text())
    assert results["tst_titan"]["max_length"] == SEQ_LEN and results["configs"]["tst_heldout"]["num_fewshot"] == 0
    lm_bpb = results["results"]["tst_heldout"]["bits_per_byte,none"]
    ppl = json.loads((evaluated / "eval_ppl.json").read_text())
    docs = [json.loads(line) for line in HELDOUT.read_text().splitlines()]
    n_bytes = sum(len(d["text"].encode("utf-8")) for d in docs)
    assert ppl["documents"] == len(docs) and ppl["bytes"] == n_bytes

    # Both, rebuilt naively from the exported model: only EOS and the last window differ.
    model_dir = evaluated / "lm_eval" / "hf-step-8"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    ids = [tok(d["text"], add_special_tokens=False)["input_ids"] for d in docs]
    ll_lm = sum(_loglik(model, _windows_lm_eval(t, bos, SEQ_LEN)) for t in ids)
    ll_ppl = sum(_loglik(model, _windows_eval_ppl(t, bos, eos, SEQ_LEN)) for t in ids)
    assert ppl["tokens"] == sum(len(t) + 1 for t in ids)
    assert lm_bpb == pytest.approx(-ll_lm / math.log(2) / n_bytes, rel=1e-5)
    assert ppl["bits_per_byte"] == pytest.approx(-ll_ppl / math.log(2) / n_bytes, rel=1e-5)
    assert abs(lm_bpb - ppl["bits_per_byte"]) < TOL_BPB, (lm_bpb, ppl["bits_per_byte"])

    # compare_runs.py's downstream table, from two run folders with lm-eval results
    table = downstream_section(["a", "b"], [evaluated, evaluated])
    mc = results["results"]["tst_tiny_mc"]
    assert f"| tst_tiny_mc | acc_norm | 0.25 | {mc['acc_norm,none']:.4f} ± {mc['acc_norm_stderr,none']:.4f} |" in table
    assert f"| tst_heldout | bits_per_byte | - | {lm_bpb:.4f} | {lm_bpb:.4f} | +0.0000 |" in table
    assert downstream_section(["a", "b"], [evaluated, evaluated / "checkpoint"]).startswith(
        "Downstream scores: no lm_eval/results.json for b")


@pytest.mark.slow  # trains a run (torchrun, one process)
def test_lm_eval_loglikelihoods_equal_a_naive_computation(evaluated):
    """Per item, through lm-eval's Python API: BOS where training put it."""
    model_dir = evaluated / "lm_eval" / "hf-step-8"
    tasks = list(tl.LOCAL_TASKS)
    results = tl.evaluate(model_dir, tasks, tl.settings_for(SEQ_LEN, "cpu"), tl.task_manager(tasks),
                          log_samples=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)

    rolling = results["samples"]["tst_heldout"]
    assert len(rolling) == 8
    for s in rolling:
        t = tok(s["doc"]["text"], add_special_tokens=False)["input_ids"]
        want = _loglik(model, _windows_lm_eval(t, tok.bos_token_id, SEQ_LEN))
        assert s["resps"][0][0] == pytest.approx(want, rel=1e-5)

    mc, correct = results["samples"]["tst_tiny_mc"], []
    assert len(mc) == 8
    for s in mc:
        q, choices = s["doc"]["question"], s["doc"]["choices"]
        ctx = tok(f"Question: {q}\nAnswer:")["input_ids"]  # the export's tokenizer adds BOS
        assert ctx[0] == tok.bos_token_id
        got = [r[0][0] for r in s["resps"]]
        want = []
        for c in choices:
            whole = tok(f"Question: {q}\nAnswer: {c}")["input_ids"]
            # lm-eval keeps the last max_length + 1 tokens of context + answer
            want.append(_loglik(model, [(whole[-(SEQ_LEN + 1):], len(whole) - len(ctx))]))
        assert got == pytest.approx(want, abs=1e-4)
        correct.append(max(range(len(want)), key=want.__getitem__) == s["doc"]["label"])
    assert results["results"]["tst_tiny_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))


@pytest.mark.slow
def test_unreachable_hub_names_the_task_in_one_line(tmp_path):
    """A task in lm-eval's format whose dataset is on the hub, with the hub out of reach."""
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        pytest.skip("needs HF_HUB_OFFLINE=1 (set by conftest unless overridden)")
    (tmp_path / "tst_hub_probe.yaml").write_text(
        "task: tst_hub_probe\ndataset_path: tst-titan/not-on-this-machine\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: 0\ndoc_to_choice: ['a', 'b']\n"
    )
    with pytest.raises(EvalError) as e:
        tl.check_tasks(tl.task_manager(["tst_hub_probe"], [str(tmp_path)]), ["tst_hub_probe"])
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("task tst_hub_probe needs its dataset from the Hugging Face hub")

    out = tmp_path / "out"
    # the tasks are checked before the model is read: no model folder needed
    proc = _wait(_script("eval_lm.py", "--hf", str(tmp_path / "no-model"), "--tasks", "tst_hub_probe",
                         "--include-path", str(tmp_path), "--out", str(out)))
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("eval_lm: error: task tst_hub_probe needs its dataset from the Hugging Face hub")
    assert "tst-titan/not-on-this-machine" in last and not out.exists()
