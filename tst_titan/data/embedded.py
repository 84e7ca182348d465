"""The embedded default corpus: the source files of the running Python's standard library.

Every Python installation carries it, so the README's run command needs no network
and no download. Documents are the ``.py`` files of the stdlib (tests, vendored and
generated directories excluded), ordered by path; a document goes to the validation
split when the CRC32 of its relative path is divisible by ``VALIDATION_EVERY``, so the
split is stable and disjoint. The corpus depends on the Python version: runs compared
with each other should use the same interpreter.
"""

from __future__ import annotations

import functools
import hashlib
import sysconfig
import zlib
from pathlib import Path

VALIDATION_EVERY = 25
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
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        parts = rel.parts[:-1]
        if any(p in _EXCLUDED_DIRS or p.startswith("config-") for p in parts):
            continue
        docs.append(rel.as_posix())
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


def corpus_fingerprint() -> str:
    """Identifies the corpus (paths and sizes), for the tokenizer cache key."""
    root = stdlib_root()
    h = hashlib.sha256()
    for d in _all_documents():
        h.update(d.encode())
        h.update(str((root / d).stat().st_size).encode())
    return h.hexdigest()[:16]
