"""The registry of data sources: every ``dataset`` kind, in one place.

=============  ==========================================  ==============================
kind           ``dataset_path``                            documents
=============  ==========================================  ==============================
embedded       (unused)                                    the stdlib's ``.py`` files, in
                                                           chunks (:mod:`.embedded`)
python_env     installed packages beside the stdlib,       every ``.py`` file of this
               comma-separated (empty: all of them)        interpreter, cleaned and
                                                           deduplicated (:mod:`.pycorpus`)
local          a file, directory or glob of ``.jsonl`` /   one per row (column
               ``.json`` / ``.parquet`` / ``.txt``         ``data.text_field``) or per
                                                           paragraph (:mod:`.local`)
hf             a Hugging Face hub dataset name             streamed rows
store          a token store directory                     tokens, already tokenized
                                                           (:mod:`.store`)
=============  ==========================================  ==============================

Three users ask the registry and nothing else about kinds: the dataloader
(:func:`open_reader`: one data-parallel rank's reader), the preparation of token stores
(:func:`source_texts`: the documents, in pieces that can be tokenized independently)
and the config checks (:func:`check_source`: cheap and offline, before any work).

An opened source is a :class:`DocumentList` (map-style: documents by index), a
:class:`HubFiles` (a streamed hub dataset whose files are its pieces) or a
:class:`~tst_titan.data.store.TokenStore`; each makes its own reader.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from torch.distributed.checkpoint.stateful import Stateful

from tst_titan.data import embedded, pycorpus
from tst_titan.data.local import load_local, local_files
from tst_titan.data.readers import MapStyleSource, StreamingSource
from tst_titan.data.store import TokenStore
from tst_titan.errors import DataError, one_line_reason


@dataclass(frozen=True)
class SourceSpec:
    """A data source as a config section or the prepare command names it. ``kind_key``
    and ``path_key`` are the setting or option names that errors start with."""

    kind: str
    path: str | None = None
    split: str = "train"  # "train" or "validation"
    text_field: str = "text"
    hf_config: str = ""
    hf_split: str = "train"
    hf_validation_split: str = "validation"
    packages: tuple[str, ...] | None = None  # python_env: stdlib + only these packages
    checked: bool = False  # opened before by this preparation: skip the full UTF-8 scan of local files
    num_proc: int | None = None  # local: processes for the files' first conversion to Arrow
    kind_key: str = "training.dataset"
    path_key: str = "training.dataset_path"

    @classmethod
    def from_config(cls, kind: str, path: str | None, split: str = "train", data_cfg=None,
                    prefix: str = "training", packages: tuple[str, ...] | None = None,
                    keys: tuple[str, str] | None = None) -> SourceSpec:
        """The spec of a ``[training]`` / ``[validation]`` section (``prefix``) and the
        ``[data]`` section (``data_cfg``; None: defaults), or of the prepare command
        (``keys = ("--source", "--path")``)."""
        kind_key, path_key = keys or (f"{prefix}.dataset", f"{prefix}.dataset_path")
        if kind == "python_env" and packages is None and path:
            packages = tuple(p.strip() for p in path.split(",") if p.strip()) or None
        data = {} if data_cfg is None else dict(
            text_field=data_cfg.text_field, hf_config=data_cfg.hf_config, hf_split=data_cfg.hf_split,
            hf_validation_split=data_cfg.hf_validation_split)
        return cls(kind=kind, path=path or None, split=split, packages=tuple(packages) if packages else None,
                   kind_key=kind_key, path_key=path_key, **data)


# -- opened sources -----------------------------------------------------------------------
class DocumentList:
    """Map-style text: ``num_documents`` documents addressed by index. Its pieces (for
    preparation) are consecutive runs of ``docs_per_piece`` documents."""

    pieces_are_files = False

    def __init__(self, description: dict[str, Any], num_documents: int, text: Callable[[int], str],
                 texts: Callable[[int, int], list[str]] | None = None):
        self.description, self.num_documents = description, num_documents
        self.spec: SourceSpec | None = None  # set when opened from a spec (worker processes reopen it)
        self.text = text
        self._texts = texts or (lambda a, b: [text(i) for i in range(a, b)])

    def reader(self, dp_rank: int, dp_world_size: int, seed: int, loop: bool, shuffle: bool) -> MapStyleSource:
        return MapStyleSource(self.text, self.num_documents, dp_rank, dp_world_size,
                              seed=seed, loop=loop, shuffle=shuffle)

    def num_pieces(self, docs_per_piece: int) -> int:
        return max(1, math.ceil(self.num_documents / docs_per_piece))

    def piece_batches(self, k: int, docs_per_piece: int, batch: int) -> Iterator[list[str]]:
        stop = min(self.num_documents, (k + 1) * docs_per_piece)
        for i in range(k * docs_per_piece, stop, batch):
            yield self._texts(i, min(stop, i + batch))


class HubFiles:
    """A hub dataset, streamed. Its pieces are its files (``datasets``' shards), so a
    preparation in pieces never reads a finished file again."""

    pieces_are_files = True

    def __init__(self, description: dict[str, Any], dataset, text_field: str):
        self.description, self._ds, self._field = description, dataset, text_field
        self.spec: SourceSpec | None = None
        self.num_documents = None

    def reader(self, dp_rank: int, dp_world_size: int, seed: int, loop: bool, shuffle: bool) -> StreamingSource:
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(self._ds, rank=dp_rank, world_size=dp_world_size)
        return StreamingSource(ds, self._field, loop=loop)

    def num_pieces(self, docs_per_piece: int) -> int:
        return int(self._ds.n_shards)

    def piece_batches(self, k: int, docs_per_piece: int, batch: int) -> Iterator[list[str]]:
        piece = self._ds.shard(num_shards=self._ds.n_shards, index=k, contiguous=True)
        for rows in piece.iter(batch_size=batch):
            yield [t or "" for t in rows[self._field]]  # a null text is an empty document


# -- the kinds ------------------------------------------------------------------------------
def _no_check(spec: SourceSpec) -> None:
    pass


def _packages_error(spec: SourceSpec, e: FileNotFoundError) -> DataError:
    key = "--packages" if spec.kind_key.startswith("--") else spec.path_key
    return DataError(f"{key}: {str(e).split(': ', 1)[-1]}")


def _check_python_env(spec: SourceSpec) -> None:
    try:
        pycorpus.default_roots(spec.packages)
    except FileNotFoundError as e:
        raise _packages_error(spec, e) from None


def _check_local(spec: SourceSpec) -> None:
    local_files(spec.path, spec.path_key)


def _open_embedded(spec: SourceSpec) -> DocumentList:
    docs = embedded.documents(spec.split)
    desc = {"kind": spec.kind, "path": spec.path, "split": spec.split, "corpus": embedded.corpus_fingerprint()}
    return DocumentList(desc, len(docs), lambda i: embedded.read_chunk(docs[i]))


def _open_python_env(spec: SourceSpec) -> DocumentList:
    try:
        corpus = pycorpus.default_corpus(spec.packages)
    except FileNotFoundError as e:
        raise _packages_error(spec, e) from None
    docs = corpus.documents(spec.split)
    desc = {"kind": spec.kind, "path": spec.path, "split": spec.split, "corpus": corpus.fingerprint()}
    if spec.packages:
        desc["packages"] = list(spec.packages)
    return DocumentList(desc, len(docs), lambda i: corpus.read_document(docs[i]))


def _open_local(spec: SourceSpec) -> DocumentList:
    ds, col = load_local(spec.path, spec.path_key, spec.text_field, num_proc=spec.num_proc,
                         validate=not spec.checked)
    desc = {"kind": spec.kind, "path": spec.path, "split": spec.split, "text_field": col}
    return DocumentList(desc, len(ds), lambda i: ds[i][col] or "",  # a null text is an empty document
                        lambda a, b: [t or "" for t in ds[a:b][col]])


def _open_hub(spec: SourceSpec) -> HubFiles:
    import datasets  # heavy; only hub sources need it

    hf_split = spec.hf_split if spec.split == "train" else spec.hf_validation_split
    try:
        ds = datasets.load_dataset(spec.path, spec.hf_config or None, split=hf_split, streaming=True)
    except Exception as e:
        raise DataError(f"{spec.path_key}: cannot open Hugging Face dataset {spec.path!r}: "
                        f"{one_line_reason(e)}") from e
    desc = {"kind": spec.kind, "path": spec.path, "split": spec.split, "hf_config": spec.hf_config,
            "hf_split": hf_split, "text_field": spec.text_field}
    return HubFiles(desc, ds, spec.text_field)


def _open_store(spec: SourceSpec) -> TokenStore:
    return TokenStore(spec.path, spec.path_key)


@dataclass(frozen=True)
class SourceKind:
    name: str
    path_help: str | None  # what dataset_path holds when it is required
    check: Callable[[SourceSpec], None]  # cheap and offline: before any work
    open: Callable[[SourceSpec], DocumentList | HubFiles | TokenStore]
    text: bool = True  # documents to tokenize (False: tokens, a store)
    # read in the training process only: the datasets library would split a streamed
    # dataset's shards among dataloader workers (each worker would see a part)
    in_process_only: bool = False


KINDS: dict[str, SourceKind] = {k.name: k for k in (
    SourceKind("embedded", None, _no_check, _open_embedded),
    SourceKind("python_env", None, _check_python_env, _open_python_env),
    SourceKind("local", "a file, directory or glob of .jsonl/.json/.parquet/.txt", _check_local, _open_local),
    SourceKind("hf", "a hub dataset name", _no_check, _open_hub, in_process_only=True),
    SourceKind("store", "a token store directory", _no_check, _open_store, text=False),
)}
DATASET_KINDS = tuple(KINDS)


def kind_of(spec: SourceSpec) -> SourceKind:
    if spec.kind not in KINDS:
        raise DataError(
            f"{spec.kind_key}: unknown dataset {spec.kind!r}; use one of {list(DATASET_KINDS)} "
            "(a hub dataset is dataset = 'hf' with dataset_path = '<name>')"
        )
    return KINDS[spec.kind]


def check_source(spec: SourceSpec) -> SourceKind:
    """The cheap checks of ``spec`` (kind, path, local files present, packages installed)."""
    kind = kind_of(spec)
    if kind.path_help and not spec.path:
        raise DataError(f"{spec.path_key}: required when {spec.kind_key} = {spec.kind!r} ({kind.path_help})")
    kind.check(spec)
    return kind


def open_source(spec: SourceSpec) -> DocumentList | HubFiles | TokenStore:
    return check_source(spec).open(spec)


def open_reader(spec: SourceSpec, dp_rank: int, dp_world_size: int, seed: int, loop: bool,
                tokenizer_dir: str | None = None) -> tuple[Stateful, bool]:
    """(reader of one data-parallel rank, whether its output is text to tokenize). A
    training split is reshuffled every epoch; a validation split keeps one fixed order.
    A token store is checked against ``tokenizer_dir`` when given."""
    kind = check_source(spec)
    data = kind.open(spec)
    if not kind.text and tokenizer_dir is not None:
        data.check_tokenizer(tokenizer_dir)
    reader = data.reader(dp_rank, dp_world_size, seed=seed, loop=loop, shuffle=spec.split == "train")
    return reader, kind.text


def build_source(kind: str, path: str | None, split: str, dp_rank: int, dp_world_size: int,
                 data_cfg, loop: bool, key_prefix: str = "training") -> Stateful:
    """The text reader of a config section's source, for one data-parallel rank."""
    spec = SourceSpec.from_config(kind, path, split, data_cfg, key_prefix)
    if not kind_of(spec).text:
        raise DataError(f"{spec.kind_key}: {kind!r} holds tokens, not texts; use the source it was prepared from")
    return open_reader(spec, dp_rank, dp_world_size, data_cfg.shuffle_seed, loop)[0]


def text_source(spec: SourceSpec) -> DocumentList | HubFiles:
    """The documents of a text source, for preparation."""
    if not kind_of(spec).text:
        raise DataError(f"{spec.kind_key}: {spec.kind!r} is already tokenized; prepare from a text source "
                        f"({', '.join(k for k, v in KINDS.items() if v.text)})")
    source = open_source(spec)
    source.spec = spec
    return source


def source_texts(kind: str, path: str | None, split: str, data_cfg,
                 packages: tuple[str, ...] | None = None, num_proc: int | None = None) -> DocumentList | HubFiles:
    """The documents of a source as the prepare command names it (errors name its options)."""
    spec = SourceSpec.from_config(kind, path, split, data_cfg, packages=packages, keys=("--source", "--path"))
    return text_source(dataclasses.replace(spec, num_proc=num_proc))
