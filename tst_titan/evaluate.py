"""Held-out evaluation: next-token loss, perplexity and bits per byte.

Documents are evaluated one by one, each as ``[BOS] text [EOS]`` cut into
non-overlapping windows of ``seq_len + 1`` tokens (no context across windows, none
across documents), so the numbers do not depend on packing or batch size. Every token
but the leading BOS is predicted; together they cover every UTF-8 byte of the text, so

    loss = NLL / tokens,  perplexity = exp(loss),  bits per byte = NLL / ln 2 / bytes

and bits per byte compares models with different tokenizers. ``logits_fn`` maps token
ids ``[B, T]`` to logits ``[B, T, V]``: a torchtitan model or a transformers one.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F


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
        raise ValueError("no tokens to evaluate: the held-out set is empty")
    loss = nll / n_tok
    return EvalResult(loss, math.exp(loss), nll / math.log(2) / max(1, n_bytes), n_tok, n_bytes, n_docs)
