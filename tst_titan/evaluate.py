"""Held-out evaluation: next-token loss, perplexity and bits per byte.

Documents are evaluated one by one, each as ``[BOS] text [EOS]`` cut into
non-overlapping windows of ``seq_len + 1`` tokens (no context across windows, none
across documents), so the numbers do not depend on packing or batch size. Every token
but the leading BOS is predicted; together they cover every UTF-8 byte of the text, so

    loss = NLL / tokens,  perplexity = exp(loss),  bits per byte = NLL / ln 2 / bytes

and bits per byte compares models with different tokenizers. ``logits_fn`` maps token
ids ``[B, T]`` to logits ``[B, T, V]``: a torchtitan model or a transformers one
(:func:`load_eval_model`: a DCP checkpoint of a run, or a Hugging Face directory).
Used by ``scripts/eval_ppl.py``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torchtitan.components.tokenizer import HuggingFaceTokenizer

from tst_titan.config import Data
from tst_titan.data.sources import build_source
from tst_titan.errors import CheckpointError, ConfigError, DataError
from tst_titan.export import load_checkpoint_model
from tst_titan.train import parse_config

DEFAULT_SEQ_LEN = 2048  # window length without a run's config


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int
    documents: int

    def describe(self) -> str:
        return (
            f"loss {self.loss:.4f}  perplexity {self.perplexity:.2f}  bits/byte {self.bits_per_byte:.4f}  "
            f"({self.documents} documents, {self.tokens:,} predicted tokens, {self.bytes:,} bytes)"
        )


@torch.no_grad()
def evaluate(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    encode: Callable[[str], list[int]],
    documents: Iterable[str],
    seq_len: int,
    max_tokens: int | None = None,
    batch_size: int = 8,
    progress_every_s: float = 10.0,
) -> EvalResult:
    nll, n_tok, n_bytes, n_docs = 0.0, 0, 0, 0
    full: list[list[int]] = []  # windows of exactly seq_len + 1 tokens, batched

    def run(windows: list[list[int]]) -> None:
        nonlocal nll, n_tok
        ids = torch.tensor(windows, dtype=torch.long)
        logits = logits_fn(ids[:, :-1]).float()
        nll += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        n_tok += ids[:, 1:].numel()

    t0 = last = time.perf_counter()
    for text in documents:
        ids = encode(text)
        for start in range(0, len(ids) - 1, seq_len):
            window = ids[start : start + seq_len + 1]
            if len(window) == seq_len + 1:
                full.append(window)
                if len(full) == batch_size:
                    run(full)
                    full = []
            else:
                run([window])
        n_docs += 1
        n_bytes += len(text.encode("utf-8"))
        now = time.perf_counter()
        if now - last > progress_every_s:
            last = now
            rate = n_tok / (now - t0)
            left = f", ETA {time.strftime('%H:%M:%S', time.gmtime((max_tokens - n_tok) / rate))}" if max_tokens else ""
            print(f"eval: {n_docs} documents, {n_tok:,} tokens, {rate:,.0f} tokens/s{left}", file=sys.stderr, flush=True)
        if max_tokens is not None and n_tok + len(full) * seq_len >= max_tokens:
            break
    if full:
        run(full)
    if n_tok == 0:
        raise DataError("no tokens to evaluate: the held-out set is empty")
    loss = nll / n_tok
    return EvalResult(loss, math.exp(loss), nll / math.log(2) / max(1, n_bytes), n_tok, n_bytes, n_docs)


@dataclass
class EvalModel:
    """What :func:`evaluate` needs of a model, and what it was loaded from."""

    logits_fn: Callable[[torch.Tensor], torch.Tensor]
    tokenizer_dir: str
    job_config: Any | None  # the run's config: held-out data and seq_len; None for a bare --hf
    description: str


def load_eval_model(
    checkpoint: str | None = None, hf: str | None = None, config: str | None = None,
    overrides: list[str] | None = None,
) -> EvalModel:
    """A run's DCP ``checkpoint`` (built from its TOML ``config`` plus ``overrides``), or
    a Hugging Face directory ``hf`` (with ``config``, that run's held-out data is used)."""
    if checkpoint:
        loaded = load_checkpoint_model(config, checkpoint, overrides)
        return EvalModel(
            loaded.model, loaded.tokenizer_dir, loaded.job_config,
            f"checkpoint {checkpoint} (step {loaded.step}, switch after {loaded.switch_step})",
        )
    from transformers import AutoModelForCausalLM  # optional: pip install -e ".[dev]"

    if not (Path(hf) / "config.json").is_file():
        raise CheckpointError(f"--hf {hf}: no config.json (not a Hugging Face model directory)")
    job_config = parse_config(["--job.config_file", config, *(overrides or [])]) if config else None
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    return EvalModel(lambda ids: model(ids).logits, hf, job_config, f"Hugging Face model {hf}")


def held_out_documents(job_config: Any | None) -> Iterable[str]:
    """The ``[validation]`` dataset of a run's config (as in training), or the embedded
    corpus's validation split without one; read once, in order."""
    if job_config is None:
        return build_source("embedded", None, "validation", 0, 1, Data(), loop=False)
    v = job_config.validation
    return build_source(
        v.dataset, v.dataset_path, "validation", 0, 1, job_config.data, loop=False, key_prefix="validation"
    )


def evaluate_model(
    model: EvalModel, seq_len: int | None = None, max_tokens: int | None = None, batch_size: int = 8,
) -> tuple[EvalResult, int]:
    """:func:`evaluate` on the model's held-out documents, ``[BOS] text [EOS]`` each; the
    window is ``seq_len``, else the run's ``training.seq_len``, else :data:`DEFAULT_SEQ_LEN`.
    Returns the result and the window used."""
    if seq_len is None:
        seq_len = model.job_config.training.seq_len if model.job_config else DEFAULT_SEQ_LEN
    if seq_len < 1:
        raise ConfigError(f"--seq-len: must be at least 1, got {seq_len}")
    tokenizer = HuggingFaceTokenizer(model.tokenizer_dir)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_bos=True, add_eos=True)

    result = evaluate(
        model.logits_fn, encode, held_out_documents(model.job_config), seq_len,
        max_tokens=max_tokens, batch_size=batch_size,
    )
    return result, seq_len
