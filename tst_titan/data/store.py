"""The token store: documents tokenized once, read at GPU speed from memory maps.

A TST phase-1 step eats ``s`` times the data tokens of a plain step, so tokenizing in
the training process starves a GPU (docs/RESULTS.md, "Data feed"). A store is made
once by ``scripts/prepare_data.py`` and read by ``training.dataset = "store"``.

Layout of a store directory::

    prepare.json            what is being prepared (written first; a rerun must match it)
    tokens-00000.npy        one shard's tokens, every document as encode(bos+text+eos),
                            concatenated (uint16 when the vocabulary fits, else uint32)
    docs-00000.npy          int64 [documents + 1]: document start offsets in the shard
    shard-00000.json        the shard's counts and file sizes (written last per shard)
    ...
    manifest.json           written last: only a complete store has one

Shard ``k`` holds documents ``[k*D, (k+1)*D)`` of the source (``D`` documents per
shard), so an interrupted preparation resumes at the first shard without its
``shard-*.json`` and a finished one is a no-op. Files are written under a temporary
name and renamed, so no reader ever sees half a file.

Reading (:class:`StoreStream`) needs no tokenizer and keeps no buffer: the stream of
one data-parallel rank is the concatenation of its documents in a per-epoch order
(:func:`tst_titan.data.sources.rank_order`, the same order on-the-fly sources use), so
any token range of it is found from the document lengths alone. Its checkpointed state
is one integer, the stream position.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from torch.distributed.checkpoint.stateful import Stateful

from tst_titan.data import embedded, pycorpus
from tst_titan.data.sources import _load_local, rank_order
from tst_titan.errors import CheckpointMismatchError, DataError, one_line_reason

FORMAT = "tst-titan-token-store/1"
MANIFEST = "manifest.json"
INTENT = "prepare.json"
DOCS_PER_SHARD = 100_000
PREPARE_HINT = "scripts/prepare_data.py"


# -- the tokenizer's identity -------------------------------------------------------
def tokenizer_fingerprint(tokenizer_dir: str | os.PathLike) -> str:
    """SHA-256 of ``tokenizer.json`` (and ``tokenizer_config.json``, which decides BOS/EOS)."""
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        p = Path(tokenizer_dir) / name
        if p.is_file():
            h.update(name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def store_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """``[tokenizer.encode(t, add_bos=True, add_eos=True) for t in texts]``, batched.

    ``tokenizer`` is torchtitan's ``HuggingFaceTokenizer``; the ``tokenizers`` library
    encodes the batch on all cores, and BOS/EOS are added by the same rule as
    ``HuggingFaceTokenizer.encode`` (only when the tokenizer does not add them itself).
    """
    encodings = tokenizer.tokenizer.encode_batch(texts)
    add_bos = not tokenizer.hf_adds_bos and tokenizer.bos_id is not None
    add_eos = not tokenizer.hf_adds_eos and tokenizer.eos_id is not None
    head, tail = [tokenizer.bos_id] * add_bos, [tokenizer.eos_id] * add_eos
    return [head + e.ids + tail for e in encodings]


# -- the manifest -----------------------------------------------------------------------
@dataclass
class Manifest:
    format: str
    tokenizer_sha256: str
    vocab_size: int
    dtype: str
    docs_per_shard: int
    source: dict[str, Any]
    num_documents: int = 0
    num_tokens: int = 0
    shards: list[dict[str, Any]] = field(default_factory=list)

    def intent(self) -> dict[str, Any]:
        """The fields a resumed preparation must agree on."""
        keys = ("format", "tokenizer_sha256", "vocab_size", "dtype", "docs_per_shard", "source")
        return {k: getattr(self, k) for k in keys}


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


# -- reading ------------------------------------------------------------------------------
class TokenStore:
    """A complete store, opened read-only (memory maps), checked before any step runs.

    Every problem is a :class:`DataError` of one line naming ``key`` and the path.
    """

    def __init__(self, path: str | os.PathLike, key: str = "training.dataset_path"):
        self.path, self.key = Path(path), key
        if not self.path.is_dir():
            raise DataError(f"{key}: no token store at {str(path)!r} (make one with {PREPARE_HINT})")
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise DataError(
                f"{key}: {str(path)!r} is an incomplete token store (no {MANIFEST}: its "
                f"preparation did not finish); run {PREPARE_HINT} again with the same arguments"
            )
        try:
            m = Manifest(**json.loads(mpath.read_text()))
        except (ValueError, TypeError) as e:
            raise DataError(f"{key}: damaged token store {str(path)!r}: unreadable {MANIFEST} ({e})") from None
        if m.format != FORMAT:
            raise DataError(f"{key}: {str(path)!r} has store format {m.format!r}, this version reads {FORMAT!r}")
        self.manifest = m
        self.dtype = np.dtype(m.dtype)
        self._tokens: list[np.ndarray] = []
        offsets: list[np.ndarray] = []
        for shard in m.shards:
            tok_f, doc_f = self.path / shard["tokens_file"], self.path / shard["docs_file"]
            for f, size in ((tok_f, shard["tokens_bytes"]), (doc_f, shard["docs_bytes"])):
                actual = f.stat().st_size if f.is_file() else None
                if actual != size:
                    what = "is missing" if actual is None else f"has {actual} bytes"
                    raise DataError(
                        f"{key}: damaged token store {str(path)!r}: {f.name} {what}, the "
                        f"manifest says {size} bytes; prepare it again"
                    )
            try:
                tokens = np.load(tok_f, mmap_mode="r")
                off = np.load(doc_f, mmap_mode="r")
            except ValueError as e:
                raise DataError(f"{key}: damaged token store {str(path)!r}: {tok_f.name}: {e}") from None
            if tokens.shape != (shard["tokens"],) or off.shape != (shard["documents"] + 1,) or (
                len(off) and int(off[-1]) != shard["tokens"]
            ):
                raise DataError(
                    f"{key}: damaged token store {str(path)!r}: {tok_f.name} does not match the manifest"
                )
            self._tokens.append(tokens)
            offsets.append(off)
        self._offsets = offsets
        # Per-document lengths and the first document of every shard: enough to find
        # any token of any rank's stream without reading tokens.
        self.doc_lengths = (
            np.concatenate([np.diff(o) for o in offsets]) if offsets else np.zeros(0, np.int64)
        )
        self._shard_first_doc = np.cumsum([0] + [s["documents"] for s in m.shards])
        if self.num_documents == 0:
            raise DataError(f"{key}: token store {str(path)!r} holds no documents")

    @property
    def num_documents(self) -> int:
        return int(self.manifest.num_documents)

    @property
    def num_tokens(self) -> int:
        return int(self.manifest.num_tokens)

    def identity(self) -> str:
        """Short id of the store's contents (recorded in checkpoints)."""
        return hashlib.sha256(
            json.dumps([self.manifest.tokenizer_sha256, self.manifest.shards], sort_keys=True).encode()
        ).hexdigest()[:16]

    def check_tokenizer(self, tokenizer_dir: str, what: str = "model.hf_assets_path") -> None:
        mine = tokenizer_fingerprint(tokenizer_dir)
        if mine != self.manifest.tokenizer_sha256:
            raise DataError(
                f"{self.key}: token store {str(self.path)!r} was made with another tokenizer "
                f"(sha256 {self.manifest.tokenizer_sha256[:12]}, this run's {what} gives "
                f"{mine[:12]}); prepare the data with this run's tokenizer"
            )

    def document(self, doc: int, start: int = 0, end: int | None = None) -> np.ndarray:
        """Tokens ``[start, end)`` of document ``doc`` (a view of the memory map)."""
        shard = int(np.searchsorted(self._shard_first_doc, doc, side="right")) - 1
        local = doc - int(self._shard_first_doc[shard])
        base = int(self._offsets[shard][local])
        stop = int(self._offsets[shard][local + 1]) if end is None else base + end
        return self._tokens[shard][base + start : stop]


class StoreStream(Stateful):
    """One data-parallel rank's token stream over a store, for the packing dataset.

    Epoch ``e`` of the stream is the concatenation of the rank's documents in
    ``rank_order(..., epoch=e)``; with ``loop`` the stream runs through epochs forever.
    ``take(n)`` returns the next ``n`` tokens and ``take(n, keep=False)`` skips them in
    O(1), which is what lets every dataloader worker skip the other workers' batches.
    The state is the stream position alone.
    """

    def __init__(
        self, store: TokenStore, dp_rank: int, dp_world_size: int, seed: int,
        loop: bool = True, shuffle: bool = True,
    ):
        if store.num_documents < dp_world_size:
            raise DataError(
                f"{store.key}: token store has {store.num_documents} documents, fewer than the "
                f"{dp_world_size} data-parallel ranks"
            )
        self.store = store
        self._rank, self._world, self._seed = dp_rank, dp_world_size, seed
        self._loop, self._shuffle = loop, shuffle
        self.position = 0
        self._epoch_start = [0]  # stream position where epoch e starts
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # epochs -------------------------------------------------------------------------
    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, cumulative token counts with a leading 0) of epoch ``e``."""
        if e not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            order = rank_order(self.store.num_documents, self._rank, self._world,
                               self._seed, e, self._shuffle)
            cum = np.zeros(len(order) + 1, dtype=np.int64)
            np.cumsum(self.store.doc_lengths[order], out=cum[1:])
            self._cache[e] = (order, cum)
        return self._cache[e]

    def _locate(self, pos: int) -> tuple[int, int] | None:
        """(epoch, offset in it) of stream position ``pos``; None past the end."""
        while True:
            e = len(self._epoch_start) - 1
            if pos < self._epoch_start[-1]:
                e = int(np.searchsorted(self._epoch_start, pos, side="right")) - 1
                return e, pos - self._epoch_start[e]
            if not self._loop and e >= 1:
                return None
            self._epoch_start.append(self._epoch_start[-1] + int(self._epoch(e)[1][-1]))

    @property
    def epoch(self) -> int:
        loc = self._locate(self.position)
        return len(self._epoch_start) - 1 if loc is None else loc[0]

    def rank_tokens_per_epoch(self) -> int:
        """Tokens of this rank's share of the store (epoch 0)."""
        return int(self._epoch(0)[1][-1])

    # reading --------------------------------------------------------------------------
    def take(self, n: int, keep: bool = True) -> np.ndarray | None:
        """The next ``n`` stream tokens (an empty array if not ``keep``); None, and no
        move, if fewer are left."""
        end = self._locate(self.position + n - 1) if n > 0 else None
        if n > 0 and end is None:
            return None
        if not keep:
            self.position += n
            return np.zeros(0, self.store.dtype)
        pieces, pos, left = [], self.position, n
        while left > 0:
            e, off = self._locate(pos)
            order, cum = self._epoch(e)
            i = int(np.searchsorted(cum, off, side="right")) - 1
            while left > 0 and i < len(order):
                a = off - int(cum[i])
                b = min(int(cum[i + 1] - cum[i]), a + left)
                pieces.append(self.store.document(int(order[i]), a, b))
                got = b - a
                left, pos, off, i = left - got, pos + got, off + got, i + 1
        self.position += n
        return np.concatenate(pieces) if len(pieces) > 1 else np.array(pieces[0])

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "store": self.store.identity()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("store")
        if saved is not None and saved != self.store.identity():
            raise CheckpointMismatchError(
                f"checkpoint was written while reading another token store ({saved}); "
                f"{self.store.key} now holds {self.store.identity()}"
            )
        self.position = int(state_dict["position"])


# -- preparing ------------------------------------------------------------------------------
@dataclass
class TextSource:
    """Documents to tokenize: ``batches(first_doc, size)`` yields lists of texts in order."""

    description: dict[str, Any]
    num_documents: int | None
    batches: Callable[[int, int], Iterator[list[str]]]


def _listed_source(desc: dict, docs: list, read: Callable[[Any], str]) -> TextSource:
    """A source whose documents are a list of handles, each read into its text by ``read``."""

    def batches(first: int, size: int) -> Iterator[list[str]]:
        for i in range(first, len(docs), size):
            yield [read(d) for d in docs[i : i + size]]

    return TextSource(desc, len(docs), batches)


def source_texts(kind: str, path: str | None, split: str, data_cfg,
                 packages: tuple[str, ...] | None = None) -> TextSource:
    """The documents of a source the recipe reads, in the order training indexes them.
    ``packages``: python_env only, stdlib + these installed packages."""
    desc = {"kind": kind, "path": path, "split": split}
    if kind == "embedded":
        desc["corpus"] = embedded.corpus_fingerprint()
        return _listed_source(desc, embedded.documents(split), embedded.read_chunk)
    if kind == "python_env":  # every .py file of this interpreter, deduplicated (pycorpus.py)
        packages = tuple(packages) if packages else None
        try:
            corpus = pycorpus.default_corpus(packages)
        except FileNotFoundError as e:
            raise DataError(str(e)) from None
        desc["corpus"] = corpus.fingerprint()
        if packages:
            desc["packages"] = list(packages)
        return _listed_source(desc, corpus.documents(split), corpus.read_document)
    if kind == "local":
        if not path:
            raise DataError("--path: required for a local source")
        ds, col = _load_local(path, "--path", data_cfg.text_field)
        desc["text_field"] = col

        def batches(first: int, size: int) -> Iterator[list[str]]:
            for i in range(first, len(ds), size):
                yield [t or "" for t in ds[i : i + size][col]]

        return TextSource(desc, len(ds), batches)
    if kind == "hf":
        import datasets

        if not path:
            raise DataError("--path: required for a hub source (a dataset name)")
        hf_split = data_cfg.hf_split if split == "train" else data_cfg.hf_validation_split
        desc.update(hf_config=data_cfg.hf_config, hf_split=hf_split, text_field=data_cfg.text_field)
        try:
            ds = datasets.load_dataset(path, data_cfg.hf_config or None, split=hf_split, streaming=True)
        except Exception as e:
            raise DataError(f"--path: cannot open Hugging Face dataset {path!r}: {one_line_reason(e)}") from e
        total = None
        try:
            total = ds.info.splits[hf_split].num_examples
        except Exception:
            pass

        def batches(first: int, size: int) -> Iterator[list[str]]:
            for batch in ds.skip(first).iter(batch_size=size):
                yield [t or "" for t in batch[data_cfg.text_field]]

        return TextSource(desc, total, batches)
    raise DataError(f"--source: unknown source {kind!r}; use embedded, python_env, local or hf")


def _progress(total: int | None, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="doc", desc="tokenizing", smoothing=0.1,
                mininterval=2.0, dynamic_ncols=True)


def prepare_store(
    source: TextSource,
    tokenizer,
    tokenizer_dir: str,
    out: str | os.PathLike,
    docs_per_shard: int = DOCS_PER_SHARD,
    batch_docs: int = 1000,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Tokenize ``source`` into a store at ``out``; resumes an interrupted preparation."""
    out = Path(out)
    vocab = int(tokenizer.get_vocab_size())
    m = Manifest(
        format=FORMAT, tokenizer_sha256=tokenizer_fingerprint(tokenizer_dir), vocab_size=vocab,
        dtype=store_dtype(vocab).name, docs_per_shard=docs_per_shard, source=source.description,
    )
    if (out / MANIFEST).is_file():
        done = Manifest(**json.loads((out / MANIFEST).read_text()))
        if done.intent() != m.intent():
            raise DataError(f"--out: {str(out)!r} holds a store prepared with other arguments; "
                            "remove it or choose another --out")
        log(f"{out}: store complete ({done.num_documents:,} documents, {done.num_tokens:,} tokens)")
        return done
    out.mkdir(parents=True, exist_ok=True)
    intent_f = out / INTENT
    if intent_f.is_file():
        if json.loads(intent_f.read_text()) != m.intent():
            raise DataError(f"--out: {str(out)!r} holds a preparation with other arguments; "
                            "remove it or choose another --out")
    else:
        _write_json_atomic(intent_f, m.intent())

    # Finished shards are kept; the first unfinished one is redone from its first document.
    shards: list[dict[str, Any]] = []
    while (out / f"shard-{len(shards):05d}.json").is_file():
        shards.append(json.loads((out / f"shard-{len(shards):05d}.json").read_text()))
    first = len(shards) * docs_per_shard
    if shards:
        log(f"{out}: resuming after {len(shards)} finished shards ({first:,} documents)")
    dtype = np.dtype(m.dtype)
    bar = _progress(source.num_documents, first)
    tokens: list[np.ndarray] = []
    lengths: list[int] = []
    n_tok_done, n_tok_new = sum(s["tokens"] for s in shards), 0
    t0 = time.perf_counter()

    def flush() -> None:
        k = len(shards)
        flat = np.concatenate(tokens) if tokens else np.zeros(0, dtype)
        off = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=off[1:])
        tok_f, doc_f = out / f"tokens-{k:05d}.npy", out / f"docs-{k:05d}.npy"
        _save_npy_atomic(tok_f, flat)
        _save_npy_atomic(doc_f, off)
        shard = {
            "tokens_file": tok_f.name, "docs_file": doc_f.name, "tokens": int(flat.size),
            "documents": len(lengths), "tokens_bytes": tok_f.stat().st_size,
            "docs_bytes": doc_f.stat().st_size,
        }
        _write_json_atomic(out / f"shard-{k:05d}.json", shard)
        shards.append(shard)
        tokens.clear()
        lengths.clear()

    for texts in source.batches(first, batch_docs):
        while texts:  # a batch may straddle a shard boundary
            part, texts = texts[: docs_per_shard - len(lengths)], texts[docs_per_shard - len(lengths) :]
            ids = encode_batch(tokenizer, part)
            top = max((max(seq) for seq in ids if seq), default=0)
            if top >= vocab:
                raise DataError(f"--tokenizer: token id {top} >= its vocabulary size {vocab}")
            tokens.extend(np.asarray(seq, dtype=dtype) for seq in ids)
            lengths.extend(len(seq) for seq in ids)
            n_tok_new += sum(len(seq) for seq in ids)
            n_tok_done += sum(len(seq) for seq in ids)
            bar.update(len(part))
            rate = n_tok_new / max(1e-9, time.perf_counter() - t0) / 1e6
            bar.set_postfix_str(f"{n_tok_done / 1e6:,.1f}M tokens, {rate:.2f}M tok/s", refresh=False)
            if len(lengths) == docs_per_shard:
                flush()
    if lengths or not shards:
        flush()
    bar.close()
    m.shards = shards
    m.num_documents = sum(s["documents"] for s in shards)
    m.num_tokens = sum(s["tokens"] for s in shards)
    _write_json_atomic(out / MANIFEST, asdict(m))  # last: the store is now complete
    log(f"{out}: {m.num_documents:,} documents, {m.num_tokens:,} tokens in {len(shards)} "
        f"shards ({m.dtype}), {time.perf_counter() - t0:.1f} s")
    return m
