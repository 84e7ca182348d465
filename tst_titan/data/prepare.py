"""Preparing a token store: a text source tokenized once, in pieces, on every core of
one machine or of many.

**Pieces.** A source's pieces are runs of ``docs_per_shard`` documents (map-style
sources) or its files (a hub dataset). Each piece becomes one shard of the store, by
itself, so a finished shard is never redone: an interrupted preparation resumes at the
unfinished pieces and a hub dataset never streams a finished file again.

**Processes.** ``processes`` worker processes tokenize pieces side by side; the
``tokenizers`` library also encodes each batch on several threads. A shard's bytes
depend on its piece alone, so the store is the same, byte for byte, for any number of
processes.

**Parts** (several machines). ``num_parts = K`` deals the pieces round-robin into K
parts (piece ``k`` to part ``k % K``); ``part = i`` prepares part ``i`` only: one
machine each (a SLURM array task), all writing into one directory on a shared file
system. A finished part leaves ``part-<i>-of-<K>.json``; :func:`merge_parts`
(``prepare_data.py --merge``) writes the manifest once every part is finished (the
last part to finish does it too). Without ``part`` one run prepares every part.

**Token cap** (``max_tokens``). Part ``j`` keeps its pieces in order until it holds
its share of the cap (``max_tokens // K``, one more for the first ``max_tokens % K``
parts): the piece that reaches the share is cut after the document that reaches it,
later pieces are dropped (and not read, except the few already under way). Without a
cap the store does not depend on K; with one, K decides which documents are kept and
is part of the store's intent: one machine with ``num_parts = K`` makes the store that
K machines make.

**Held-out carving** (:class:`Holdout`). A document is held out when a hash of its
text is divisible by ``every``; a preparation keeps the held-out documents (its
``split`` is "validation") or the others ("train"), so the two stores made from one
source with the same ``every`` are disjoint by construction, whatever their caps.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
from torchtitan.components.tokenizer import HuggingFaceTokenizer
from tqdm.auto import tqdm

from tst_titan.data.parts import Part, merge_parts, part_quota
from tst_titan.data.sources import SourceSpec, source_texts, text_source
from tst_titan.data.store import (
    FORMAT, INTENT, MANIFEST, Manifest, NpyWriter, finish_shard, part_file, shard_files, store_dtype,
    tokenizer_fingerprint, write_json_atomic,
)
from tst_titan.errors import DataError

__all__ = ["DOCS_PER_SHARD", "Holdout", "merge_parts", "prepare_store", "source_texts"]

DOCS_PER_SHARD = 100_000


class TextSource(Protocol):
    """What a preparation reads (:class:`tst_titan.data.sources.DocumentList`, ``HubFiles``)."""

    description: dict[str, Any]
    spec: SourceSpec | None

    def num_pieces(self, docs_per_piece: int) -> int: ...

    def piece_batches(self, k: int, docs_per_piece: int, batch: int) -> Iterator[list[str]]: ...


@dataclass(frozen=True)
class Holdout:
    """Carve a held-out set out of a source without one: ``keep`` "validation" keeps the
    documents whose text hash is divisible by ``every``, "train" keeps the others."""

    every: int
    keep: str

    def keeps(self, text: str) -> bool:
        return is_held_out(text, self.every) == (self.keep == "validation")


def is_held_out(text: str, every: int) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % every == 0


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """``[tokenizer.encode(t, add_bos=True, add_eos=True) for t in texts]``, batched.

    ``tokenizer`` is torchtitan's ``HuggingFaceTokenizer``; the ``tokenizers`` library
    encodes the batch on several threads, and BOS/EOS are added by the same rule as
    ``HuggingFaceTokenizer.encode`` (only when the tokenizer does not add them itself).
    """
    encodings = tokenizer.tokenizer.encode_batch(texts)
    add_bos = not tokenizer.hf_adds_bos and tokenizer.bos_id is not None
    add_eos = not tokenizer.hf_adds_eos and tokenizer.eos_id is not None
    head, tail = [tokenizer.bos_id] * add_bos, [tokenizer.eos_id] * add_eos
    return [head + e.ids + tail for e in encodings]


# -- one piece --------------------------------------------------------------------------
@dataclass(frozen=True)
class PieceJob:
    """Everything a worker process needs to tokenize pieces (picklable)."""

    spec: SourceSpec | None
    tokenizer_dir: str
    out: str
    docs_per_shard: int
    batch_docs: int
    dtype: str
    vocab: int
    holdout: Holdout | None


def tokenize_piece(source: TextSource, tokenizer, job: PieceJob, k: int, limit: int | None) -> dict[str, Any]:
    """Tokenize piece ``k`` into shard ``k`` (record written last); with ``limit``, stop
    after the document that brings the shard to ``limit`` tokens."""
    out, dtype = Path(job.out), np.dtype(job.dtype)
    tok_name, doc_name, rec_name = shard_files(k)
    writer = NpyWriter(out / tok_name, dtype)
    lengths: list[int] = []
    try:
        for texts in source.piece_batches(k, job.docs_per_shard, job.batch_docs):
            if job.holdout is not None:
                texts = [t for t in texts if job.holdout.keeps(t)]
            ids = encode_batch(tokenizer, texts) if texts else []
            if limit is not None:
                cum = np.cumsum([len(s) for s in ids]) + writer.size
                stop = int(np.searchsorted(cum, limit, side="left")) + 1  # first reaching the limit
                ids = ids[:stop]
            n = sum(len(s) for s in ids)
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=n)
            if n and int(flat.max()) >= job.vocab:
                raise DataError(f"--tokenizer: token id {int(flat.max())} >= its vocabulary size {job.vocab}")
            writer.append(flat)
            lengths.extend(len(s) for s in ids)
            if limit is not None and writer.size >= limit:
                break
    except BaseException:
        writer.abort()
        raise
    tokens_bytes = writer.close()
    return finish_shard(out, k, lengths, tokens_bytes, writer.size)


# -- worker processes -------------------------------------------------------------------------
_WORKER: dict[PieceJob, tuple[TextSource, Any]] = {}


def _init_worker(threads: int) -> None:
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # the tokenizers library's threads, per process
    os.environ["TOKENIZERS_PARALLELISM"] = "true"


def _worker_context() -> multiprocessing.context.BaseContext:
    """Fresh worker processes, never forks of this one (its tokenizer and Arrow threads
    may hold locks): forked from a server that imported this module once, where
    available, else spawned."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


def _run_piece(job: PieceJob, k: int, limit: int | None) -> dict[str, Any]:
    if job not in _WORKER:
        _WORKER[job] = (text_source(job.spec), HuggingFaceTokenizer(job.tokenizer_dir))
    source, tokenizer = _WORKER[job]
    return tokenize_piece(source, tokenizer, job, k, limit)


# -- the preparation ---------------------------------------------------------------------------
def _intent(source: TextSource, tokenizer, tokenizer_dir: str, docs_per_shard: int,
            max_tokens: int | None, holdout: Holdout | None, num_parts: int) -> Manifest:
    vocab = int(tokenizer.get_vocab_size())
    desc = dict(source.description)
    if holdout is not None:
        desc.update(split=holdout.keep, holdout_every=holdout.every)
    return Manifest(
        format=FORMAT, tokenizer_sha256=tokenizer_fingerprint(tokenizer_dir), vocab_size=vocab,
        dtype=store_dtype(vocab).name,
        docs_per_shard=0 if getattr(source, "pieces_are_files", False) else docs_per_shard,
        source=desc, max_tokens=max_tokens, num_parts=num_parts if max_tokens is not None else 1,
    )


def _claim(out: Path, m: Manifest) -> None:
    """Write the intent, or check that the one there is the same."""
    out.mkdir(parents=True, exist_ok=True)
    intent_f = out / INTENT
    if intent_f.is_file():
        if json.loads(intent_f.read_text()) != m.intent():
            raise DataError(f"--out: {str(out)!r} holds a preparation with other arguments; "
                            "remove it or choose another --out")
    else:
        write_json_atomic(intent_f, m.intent())


def prepare_store(
    source: TextSource,
    tokenizer,
    tokenizer_dir: str,
    out: str | os.PathLike,
    docs_per_shard: int = DOCS_PER_SHARD,
    batch_docs: int = 1000,
    log: Callable[[str], None] = print,
    *,
    max_tokens: int | None = None,
    holdout: Holdout | None = None,
    num_parts: int = 1,
    part: int | None = None,
    processes: int = 1,
    threads: int | None = None,
) -> Manifest | None:
    """Tokenize ``source`` into a store at ``out`` (see the module docstring); resumes an
    interrupted preparation. The manifest, or None when only ``part`` was prepared and
    other parts are still unfinished."""
    out = Path(out)
    if num_parts < 1 or (part is not None and not 0 <= part < num_parts):
        raise DataError(f"--shard: must be in [0, --num-shards={num_parts}), got {part}")
    if max_tokens is not None and max_tokens < num_parts:
        raise DataError(f"--max-tokens: must be at least --num-shards ({num_parts}), got {max_tokens}")
    m = _intent(source, tokenizer, tokenizer_dir, docs_per_shard, max_tokens, holdout, num_parts)
    if (out / MANIFEST).is_file():
        done = Manifest(**json.loads((out / MANIFEST).read_text()))
        if done.intent() != m.intent():
            raise DataError(f"--out: {str(out)!r} holds a store prepared with other arguments; "
                            "remove it or choose another --out")
        log(f"{out}: store complete ({done.num_documents:,} documents, {done.num_tokens:,} tokens)")
        return done
    _claim(out, m)
    n = source.num_pieces(docs_per_shard)
    parts = []
    for j in ([part] if part is not None else range(num_parts)):
        if (out / part_file(j, num_parts)).is_file():
            continue  # finished (cut and all) by an earlier run
        pieces = list(range(j, n, num_parts))
        records = {k: json.loads((out / shard_files(k)[2]).read_text())
                   for k in pieces if (out / shard_files(k)[2]).is_file()}
        parts.append(Part(j, pieces, part_quota(max_tokens, j, num_parts), records))
    finished = sum(len(p.records) for p in parts)
    if finished:
        log(f"{out}: resuming after {finished} finished shards "
            f"({sum(r['documents'] for p in parts for r in p.records.values()):,} documents); "
            "they are not redone")
    job = PieceJob(dataclasses.replace(source.spec, checked=True) if source.spec else None, str(tokenizer_dir),
                   str(out), docs_per_shard, batch_docs, m.dtype, m.vocab_size, holdout)
    t0 = time.perf_counter()
    new_tokens = _run_pieces(parts, n, source, tokenizer, job, processes, threads)
    for p in parts:
        write_json_atomic(out / part_file(p.index, num_parts), p.finalize(out))
    seconds = time.perf_counter() - t0
    if new_tokens:
        log(f"{out}: tokenized {new_tokens:,} tokens in {seconds:.1f} s = {new_tokens / seconds / 1e6:.2f}M "
            f"tokens/s ({max(1, processes)} process{'es' if processes > 1 else ''})")
    missing = [j for j in range(num_parts) if not (out / part_file(j, num_parts)).is_file()]
    if missing:
        log(f"{out}: part {part} of {num_parts} finished; waiting for parts {missing} "
            f"(then run prepare_data.py --merge --out {out} --num-shards {num_parts})")
        return None
    return merge_parts(out, num_parts, log)


def _run_pieces(parts: list[Part], n: int, source: TextSource, tokenizer, job: PieceJob,
                processes: int, threads: int | None) -> int:
    """Tokenize the unfinished pieces the parts need, in piece order; tokens written."""
    owner = {k: p for p in parts for k in p.pieces}
    todo = sorted(k for p in parts for k in p.pieces if k not in p.records)
    bar = tqdm(total=len(todo), unit="shard", desc="tokenizing", mininterval=2.0, dynamic_ncols=True)
    state = {"tokens": 0, "t0": time.perf_counter()}

    def done(k: int, record: dict[str, Any]) -> None:
        owner[k].records[k] = record
        state["tokens"] += record["tokens"]
        rate = state["tokens"] / max(1e-9, time.perf_counter() - state["t0"]) / 1e6
        bar.update(1)
        bar.set_postfix_str(f"{state['tokens'] / 1e6:,.1f}M tokens, {rate:.2f}M tok/s", refresh=False)

    def next_pieces() -> Iterator[tuple[int, int | None]]:
        for k in todo:
            limit = owner[k].limit()
            if limit is None or limit > 0:  # else the part's finished pieces already reach its quota
                yield k, limit

    procs = min(max(1, processes), len(todo))
    try:
        if procs <= 1:
            for k, limit in next_pieces():
                done(k, tokenize_piece(source, tokenizer, job, k, limit))
        else:
            if job.spec is None:
                raise DataError("--processes: this source cannot be reopened in worker processes; use 1")
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            ctx = _worker_context()
            with cf.ProcessPoolExecutor(procs, mp_context=ctx, initializer=_init_worker,
                                        initargs=(threads or max(1, cores // procs),)) as pool:
                pending: dict[cf.Future, int] = {}
                feed = next_pieces()
                while True:
                    while len(pending) < 2 * procs:  # a short queue: the cap stops the feed early
                        nxt = next(feed, None)
                        if nxt is None:
                            break
                        pending[pool.submit(_run_piece, job, *nxt)] = nxt[0]
                    if not pending:
                        break
                    ready, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    for f in sorted(ready, key=pending.get):
                        done(pending.pop(f), f.result())
    finally:
        bar.close()
    return state["tokens"]
