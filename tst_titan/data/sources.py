"""Document sources: where text comes from, one data-parallel shard at a time.

A source yields document texts for one data-parallel rank and is ``Stateful``: its
state says exactly which documents were handed out, so a resumed run continues with
the next document. ``training.dataset`` picks the kind:

- ``embedded``: the stdlib corpus shipped with Python, in file chunks
  (:mod:`tst_titan.data.embedded`);
- ``local``: ``training.dataset_path`` is a file, directory or glob of ``.jsonl`` /
  ``.json`` / ``.parquet`` (column ``data.text_field``) or ``.txt`` files (one
  document per paragraph), loaded map-style with Hugging Face ``datasets``;
- ``hf``: ``training.dataset_path`` is a Hugging Face hub dataset name, streamed.

Map-style sources (embedded, local) shard by document index (rank r takes documents
r, r+W, ...) of a seeded permutation that is redrawn every epoch; they resume exactly
even after looping. Streaming sources resume through the ``datasets`` iterable's own
state, which is exact within the first epoch only (torchtitan's behaviour too).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from torch.distributed.checkpoint.stateful import Stateful

from tst_titan.data import embedded
from tst_titan.errors import DataError, one_line_reason

DATASET_KINDS = ("embedded", "local", "hf", "store")
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def rank_order(
    num_documents: int, rank: int, world: int, seed: int, epoch: int, shuffle: bool = True
) -> np.ndarray:
    """Document indices rank ``rank`` of ``world`` reads in ``epoch``: every W-th entry of
    a permutation drawn from ``seed + epoch`` (the identity when not shuffling).

    Shared by text sources and token stores, so a store serves exactly the stream that
    on-the-fly tokenization of the same documents would.
    """
    if shuffle:
        order = np.random.default_rng(seed + epoch).permutation(num_documents)
    else:
        order = np.arange(num_documents)
    return order[rank::world]


class MapStyleSource(Stateful):
    """Documents addressable by index; rank ``r`` of ``W`` reads every W-th of a
    per-epoch permutation."""

    def __init__(
        self,
        get_document: Callable[[int], str],
        num_documents: int,
        dp_rank: int,
        dp_world_size: int,
        seed: int,
        loop: bool = True,
        shuffle: bool = True,
    ):
        if num_documents < dp_world_size:
            raise DataError(
                f"dataset has {num_documents} documents, fewer than the "
                f"{dp_world_size} data-parallel ranks"
            )
        self.get_document = get_document
        self.num_documents = num_documents
        self._rank, self._world = dp_rank, dp_world_size
        self._seed, self._loop, self._shuffle = seed, loop, shuffle
        self.epoch, self.position = 0, 0

    @property
    def documents_per_rank(self) -> int:
        return len(range(self._rank, self.num_documents, self._world))

    def _rank_order(self, epoch: int) -> list[int]:
        return rank_order(self.num_documents, self._rank, self._world, self._seed, epoch, self._shuffle).tolist()

    def __iter__(self) -> Iterator[str]:
        while True:
            order = self._rank_order(self.epoch)
            while self.position < len(order):
                idx = order[self.position]
                self.position += 1  # count it before handing it out
                yield self.get_document(idx)
            if not self._loop:
                return
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch, self.position = int(state_dict["epoch"]), int(state_dict["position"])


class StreamingSource(Stateful):
    """A streamed Hugging Face dataset, split by node, looped by epoch."""

    def __init__(self, dataset, text_field: str, loop: bool = True):
        self._ds, self._field, self._loop = dataset, text_field, loop
        self.epoch = 0
        self.num_documents = None

    def __iter__(self) -> Iterator[str]:
        while True:
            self._ds.set_epoch(self.epoch)
            for row in self._ds:
                yield row[self._field]
            if not self._loop:
                return
            self.epoch += 1

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "hf": self._ds.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch = int(state_dict["epoch"])
        self._ds.load_state_dict(state_dict["hf"])


def _local_files(path: str, key: str) -> tuple[str, list[str]]:
    if os.path.isdir(path):
        files = sorted(
            str(p) for p in Path(path).rglob("*") if p.suffix in _BUILDERS and p.is_file()
        )
    elif any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path, recursive=True))
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataError(f"{key}: {path!r} does not exist")
    if not files:
        raise DataError(f"{key}: no .jsonl/.json/.parquet/.txt files in {path!r}")
    builders = {_BUILDERS.get(Path(f).suffix) for f in files}
    if None in builders:
        bad = next(f for f in files if Path(f).suffix not in _BUILDERS)
        raise DataError(f"{key}: unsupported file type {bad!r} (use .jsonl, .json, .parquet or .txt)")
    if len(builders) > 1:
        raise DataError(f"{key}: mixes file types {sorted(builders)}; use one type per dataset")
    return builders.pop(), files


def _first_non_utf8(files: list[str]) -> str | None:
    """``"<file> (byte N)"`` of the first byte that is not UTF-8, or None."""
    import codecs

    for f in files:
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    return f"{f} (byte {max(0, offset + e.start - len(decoder.getstate()[0]))})"
                offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return f"{f} (truncated character at the end)"
    return None


def _not_utf8_error(key: str, where: str) -> DataError:
    return DataError(
        f"{key}: {where} is not valid UTF-8; re-encode it (e.g. iconv -f latin1 -t utf-8) "
        "or drop the bad bytes"
    )


def _load_local(path: str, key: str, text_field: str):
    import datasets

    builder, files = _local_files(path, key)
    if all(os.path.getsize(f) == 0 for f in files):
        raise DataError(f"{key}: {path!r} holds no documents (empty files)")
    kwargs: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    except Exception as e:  # surface the file and the reason in one line
        bad = _first_non_utf8(files) if builder in ("text", "json") else None
        if bad:
            raise _not_utf8_error(key, bad) from e
        reason = one_line_reason(e)
        raise DataError(f"{key}: cannot read {path!r}: {reason}") from e
    field = "text" if builder == "text" else text_field
    if field not in ds.column_names:
        raise DataError(
            f"data.text_field: column {field!r} not in {path!r} (columns: {ds.column_names})"
        )
    if len(ds) == 0:
        raise DataError(f"{key}: {path!r} holds no documents")
    ds = ds.select_columns([field])
    try:  # Arrow's own UTF-8 check of the text column, before any step runs
        ds.data.table.validate(full=True)
    except Exception as e:
        raise _not_utf8_error(key, _first_non_utf8(files) or repr(path)) from e
    return ds, field


def build_source(
    kind: str,
    path: str | None,
    split: str,
    dp_rank: int,
    dp_world_size: int,
    data_cfg,
    loop: bool,
    key_prefix: str = "training",
) -> Stateful:
    """Build the document source for one data-parallel rank."""
    kind_key, path_key = f"{key_prefix}.dataset", f"{key_prefix}.dataset_path"
    def map_style(get_document: Callable[[int], str], n: int) -> MapStyleSource:
        # Training data is reshuffled per epoch; validation keeps one fixed order.
        return MapStyleSource(
            get_document, n, dp_rank, dp_world_size,
            seed=data_cfg.shuffle_seed, loop=loop, shuffle=split == "train",
        )

    if kind == "embedded":
        docs = embedded.documents(split)
        return map_style(lambda i: embedded.read_chunk(docs[i]), len(docs))
    if kind == "local":
        if not path:
            raise DataError(f"{path_key}: required when {kind_key} = 'local'")
        ds, field = _load_local(path, path_key, data_cfg.text_field)
        return map_style(lambda i: ds[i][field] or "", len(ds))  # a null text is an empty document
    if kind == "hf":
        if not path:
            raise DataError(f"{path_key}: required when {kind_key} = 'hf' (a hub dataset name)")
        import datasets
        from datasets.distributed import split_dataset_by_node

        hf_split = data_cfg.hf_split if split == "train" else data_cfg.hf_validation_split
        try:
            ds = datasets.load_dataset(
                path, data_cfg.hf_config or None, split=hf_split, streaming=True
            )
        except Exception as e:
            reason = one_line_reason(e)
            raise DataError(f"{path_key}: cannot open Hugging Face dataset {path!r}: {reason}") from e
        ds = split_dataset_by_node(ds, rank=dp_rank, world_size=dp_world_size)
        return StreamingSource(ds, data_cfg.text_field, loop=loop)
    raise DataError(
        f"{kind_key}: unknown dataset {kind!r}; use one of {list(DATASET_KINDS)} "
        "(a hub dataset is dataset = 'hf' with dataset_path = '<name>')"
    )
