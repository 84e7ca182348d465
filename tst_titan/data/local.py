"""Local document files: ``.jsonl`` / ``.json`` / ``.parquet`` (a text column) or ``.txt``
(one document per paragraph), given as a file, a directory or a glob.

They are loaded map-style with Hugging Face ``datasets`` (converted to Arrow once and
memory-mapped), so any document is addressable by index. Every problem is a one-line
:class:`DataError` naming the config key or option and the file: a missing path, a
mixed or unsupported file type, a missing text column, no documents, or text that is
not UTF-8 (with the byte offset of the first bad byte).
"""

from __future__ import annotations

import codecs
import glob
import os
from pathlib import Path
from typing import Any

from tst_titan.errors import DataError, one_line_reason

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def local_files(path: str, key: str) -> tuple[str, list[str]]:
    """(``datasets`` builder, sorted files) of a file, directory or glob; cheap (no reading)."""
    if os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).rglob("*") if p.suffix in BUILDERS and p.is_file())
    elif any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path, recursive=True))
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataError(f"{key}: {path!r} does not exist")
    if not files:
        raise DataError(f"{key}: no .jsonl/.json/.parquet/.txt files in {path!r}")
    builders = {BUILDERS.get(Path(f).suffix) for f in files}
    if None in builders:
        bad = next(f for f in files if Path(f).suffix not in BUILDERS)
        raise DataError(f"{key}: unsupported file type {bad!r} (use .jsonl, .json, .parquet or .txt)")
    if len(builders) > 1:
        raise DataError(f"{key}: mixes file types {sorted(builders)}; use one type per dataset")
    return builders.pop(), files


def first_non_utf8(files: list[str]) -> str | None:
    """``"<file> (byte N)"`` of the first byte that is not UTF-8, or None."""
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


def load_local(path: str, key: str, text_field: str, num_proc: int | None = None, validate: bool = True):
    """(map-style ``datasets.Dataset`` with only the text column, that column's name).

    ``num_proc``: processes for the first conversion to Arrow (one file each); later
    loads of the same files read the cache. ``validate``: scan the whole text column
    for bad UTF-8 (skipped by preparation workers: their parent scanned it).
    """
    import datasets  # heavy; only local sources need it

    builder, files = local_files(path, key)
    if all(os.path.getsize(f) == 0 for f in files):
        raise DataError(f"{key}: {path!r} holds no documents (empty files)")
    kwargs: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
    if num_proc and num_proc > 1 and len(files) > 1:
        kwargs["num_proc"] = min(num_proc, len(files))
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    except Exception as e:  # surface the file and the reason in one line
        bad = first_non_utf8(files) if builder in ("text", "json") else None
        if bad:
            raise _not_utf8_error(key, bad) from e
        raise DataError(f"{key}: cannot read {path!r}: {one_line_reason(e)}") from e
    field = "text" if builder == "text" else text_field
    if field not in ds.column_names:
        raise DataError(
            f"data.text_field: column {field!r} not in {path!r} (columns: {ds.column_names})"
        )
    if len(ds) == 0:
        raise DataError(f"{key}: {path!r} holds no documents")
    ds = ds.select_columns([field])
    if not validate:
        return ds, field
    try:  # Arrow's own UTF-8 check of the text column, before any step runs
        ds.data.table.validate(full=True)
    except Exception as e:
        raise _not_utf8_error(key, first_non_utf8(files) or repr(path)) from e
    return ds, field
