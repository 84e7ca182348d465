"""The token store's format: documents tokenized once, read at GPU speed from memory maps.

A TST phase-1 step eats ``s`` times the data tokens of a plain step, so tokenizing in
the training process starves a GPU (docs/RESULTS.md, "Data feed"). A store is made
once by ``scripts/prepare_data.py`` (:mod:`tst_titan.data.prepare`) and read by
``training.dataset = "store"``.

Layout of a store directory::

    prepare.json            what is being prepared (written first; a rerun must match it)
    tokens-00000.npy        one shard's tokens, every document as encode(bos+text+eos),
                            concatenated (uint16 when the vocabulary fits, else uint32)
    docs-00000.npy          int64 [documents + 1]: document start offsets in the shard
    shard-00000.json        the shard's counts and file sizes (written last per shard)
    ...
    part-00000-of-00001.json  one per part of the preparation: its shards, once final
    manifest.json           written last: only a complete store has one

Shard ``k`` holds the documents of piece ``k`` of the source: documents
``[k*D, (k+1)*D)`` of a map-style source (``docs_per_shard = D``), or file ``k`` of a
hub dataset (``docs_per_shard = 0``). The manifest lists the shards in order; the
store's documents are theirs, concatenated. Every file is written under a temporary
name and renamed, so no reader ever sees half a file.

Reading (:class:`StoreStream`) needs no tokenizer and keeps no buffer: the stream of
one data-parallel rank is the concatenation of its documents in a per-epoch order
(:func:`tst_titan.data.readers.rank_order`, the same order on-the-fly sources use), so
any token range of it is found from the document lengths alone. Its checkpointed state
is one integer, the stream position.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format
from torch.distributed.checkpoint.stateful import Stateful

from tst_titan.data.readers import rank_order
from tst_titan.errors import CheckpointMismatchError, DataError

FORMAT = "tst-titan-token-store/1"
MANIFEST = "manifest.json"
INTENT = "prepare.json"
PREPARE_HINT = "scripts/prepare_data.py"
_NPY_HEADER = 128  # bytes of the .npy header np.save writes for any 1-D array


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


# -- the manifest -----------------------------------------------------------------------
@dataclass
class Manifest:
    format: str
    tokenizer_sha256: str
    vocab_size: int
    dtype: str
    docs_per_shard: int  # 0: one shard per file of a hub dataset
    source: dict[str, Any]
    num_documents: int = 0
    num_tokens: int = 0
    shards: list[dict[str, Any]] = field(default_factory=list)
    max_tokens: int | None = None  # the token cap of the preparation (None: the whole source)
    num_parts: int = 1  # the cap is split over this many parts (only with a cap)

    def intent(self) -> dict[str, Any]:
        """The fields a resumed preparation must agree on (the cap and its parts only
        when there is a cap, so stores prepared without one keep their intent)."""
        keys = ["format", "tokenizer_sha256", "vocab_size", "dtype", "docs_per_shard", "source"]
        if self.max_tokens is not None:
            keys += ["max_tokens", "num_parts"]
        return {k: getattr(self, k) for k in keys}

    def to_json(self) -> dict[str, Any]:
        out = {**self.intent(), "num_documents": self.num_documents, "num_tokens": self.num_tokens,
               "shards": self.shards}
        return out


# -- writing files ----------------------------------------------------------------------
def shard_files(k: int) -> tuple[str, str, str]:
    """(tokens, document offsets, shard record) file names of shard ``k``."""
    return f"tokens-{k:05d}.npy", f"docs-{k:05d}.npy", f"shard-{k:05d}.json"


def part_file(part: int, num_parts: int) -> str:
    return f"part-{part:05d}-of-{num_parts:05d}.json"


def write_json_atomic(path: Path, obj: Any) -> None:
    # a name of its own: several machines may write the same file (the same content)
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def finish_shard(out: Path, k: int, lengths: list[int], tokens_bytes: int, tokens: int) -> dict[str, Any]:
    """Shard ``k``'s document offsets and its record (written last: the shard is finished)."""
    tok_name, doc_name, rec_name = shard_files(k)
    off = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=off[1:])
    save_npy_atomic(out / doc_name, off)
    record = {"tokens_file": tok_name, "docs_file": doc_name, "tokens": int(tokens), "documents": len(lengths),
              "tokens_bytes": tokens_bytes, "docs_bytes": (out / doc_name).stat().st_size}
    write_json_atomic(out / rec_name, record)
    return record


class NpyWriter:
    """A 1-D ``.npy`` file written piece by piece (memory stays at one piece), then
    renamed into place: byte for byte what ``np.save`` of the concatenation writes."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype, self.size = Path(path), np.dtype(dtype), 0
        self._tmp = self.path.with_name(self.path.name + ".tmp.npy")
        self._fh = open(self._tmp, "wb")
        self._fh.seek(_NPY_HEADER)

    def append(self, array: np.ndarray) -> None:
        self._fh.write(np.ascontiguousarray(array, dtype=self.dtype).tobytes())
        self.size += int(array.size)

    def close(self) -> int:
        """Write the header, rename into place; the file's size in bytes."""
        self._fh.seek(0)
        header = {"descr": npy_format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.size,)}
        npy_format.write_array_header_1_0(self._fh, header)
        assert self._fh.tell() == _NPY_HEADER, self._fh.tell()
        self._fh.close()
        os.replace(self._tmp, self.path)
        return self.path.stat().st_size

    def abort(self) -> None:
        self._fh.close()
        self._tmp.unlink(missing_ok=True)


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

    def reader(self, dp_rank: int, dp_world_size: int, seed: int, loop: bool, shuffle: bool) -> "StoreStream":
        """One data-parallel rank's token stream (what the packing dataset reads)."""
        return StoreStream(self, dp_rank, dp_world_size, seed=seed, loop=loop, shuffle=shuffle)

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
