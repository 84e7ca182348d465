"""The embedded default corpus: the source files of the running Python's standard library.

Every Python installation carries it, so the README's run command needs no network
and no download. Files are the ``.py`` files of the stdlib (tests, vendored and
generated directories excluded), ordered by path; a file goes to the validation split
when the CRC32 of its relative path is divisible by ``VALIDATION_EVERY``, so the split
is stable and disjoint. The corpus depends on the Python version: runs compared with
each other should use the same interpreter.

Training documents are **chunks** of those files (:func:`documents`): consecutive
blank-line-separated blocks of at least ``CHUNK_CHARS`` characters. Whole files would
make poor documents: 43% of the text is in files over 50k characters, so a rank's
packed stream would feed one file for dozens of consecutive steps and the loss would
follow whichever module is being read. Shuffled chunks keep steps close to i.i.d.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
import zlib
from pathlib import Path

VALIDATION_EVERY = 25
CHUNK_CHARS = 3000
_EXCLUDED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "lib2to3",
        "ensurepip",
        "turtledemo",
    }
)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=None)
def _all_documents() -> tuple[str, ...]:
    root = stdlib_root()
    docs = []
    # os.walk with pruning: never descends into site-packages (rglob would, for seconds).
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _EXCLUDED_DIRS and not d.startswith("config-")]
        rel_folder = Path(folder).relative_to(root)
        docs += [(rel_folder / f).as_posix() for f in files if f.endswith(".py")]
    if not docs:
        raise FileNotFoundError(
            f"embedded corpus: no .py files under the stdlib at {root}; "
            "set training.dataset to 'local' or 'hf' instead"
        )
    return tuple(sorted(docs))


def is_validation(rel_path: str) -> bool:
    return zlib.crc32(rel_path.encode()) % VALIDATION_EVERY == 0


def document_paths(split: str) -> list[str]:
    """Relative paths (posix) of the documents of ``split`` ("train" or "validation")."""
    if split not in ("train", "validation"):
        raise ValueError(f"embedded corpus has splits 'train' and 'validation', not {split!r}")
    want_val = split == "validation"
    return [d for d in _all_documents() if is_validation(d) == want_val]


def read_document(rel_path: str) -> str:
    return (stdlib_root() / rel_path).read_text(encoding="utf-8", errors="replace")


def chunk_bounds(text: str, target: int = CHUNK_CHARS) -> list[tuple[int, int]]:
    """[start, end) character ranges that tile ``text``: each cut follows a blank line
    once the chunk has ``target`` characters (or any line end past ``4 x target``, for
    files without blank lines); a short tail joins the chunk before it."""
    bounds, start, n = [], 0, len(text)
    while n - start > target:
        cut = text.find("\n\n", start + target)
        cut = cut + 2 if cut >= 0 else -1
        if cut < 0 or cut - start > 4 * target:
            line = text.find("\n", start + target)
            cut = line + 1 if 0 <= line < start + 4 * target else cut
        if cut < 0 or cut >= n:
            break
        bounds.append((start, cut))
        start = cut
    if bounds and n - start < target // 4:
        bounds[-1] = (bounds[-1][0], n)
    else:
        bounds.append((start, n))
    return bounds


@functools.lru_cache(maxsize=None)
def documents(split: str) -> tuple[tuple[str, int, int], ...]:
    """The documents of ``split``: (relative path, start, end) chunks of its files."""
    out = []
    for path in document_paths(split):
        out += [(path, a, b) for a, b in chunk_bounds(read_document(path))]
    return tuple(out)


@functools.lru_cache(maxsize=4)
def _cached_text(rel_path: str) -> str:
    return read_document(rel_path)


def read_chunk(doc: tuple[str, int, int]) -> str:
    path, start, end = doc
    return _cached_text(path)[start:end]


def corpus_fingerprint() -> str:
    """Identifies the corpus (paths and sizes), for the tokenizer cache key."""
    root = stdlib_root()
    h = hashlib.sha256()
    for d in _all_documents():
        h.update(d.encode())
        h.update(str((root / d).stat().st_size).encode())
    return h.hexdigest()[:16]
