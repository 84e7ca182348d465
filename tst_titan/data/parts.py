"""The parts of a preparation and its token cap (see :mod:`tst_titan.data.prepare`).

Part ``j`` of ``K`` owns pieces ``j, j+K, j+2K, ...`` and, under a cap, a quota of
tokens. Its pieces may finish in any order (worker processes); what the part keeps is
decided by the pieces' token counts alone, in piece order: whole pieces while the part
is under its quota, the piece that reaches the quota cut after the document that
reaches it, none after. So the kept documents never depend on the number of processes
or on how often the preparation was interrupted. A finished part leaves its record;
:func:`merge_parts` turns the records of all parts into the store's manifest.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tst_titan.data.store import (
    INTENT, MANIFEST, Manifest, NpyWriter, finish_shard, part_file, shard_files, write_json_atomic,
)
from tst_titan.errors import DataError


def cut_shard(out: Path, k: int, record: dict[str, Any], needed: int) -> dict[str, Any]:
    """Shard ``k`` cut after the first document that reaches ``needed`` tokens (its record
    is removed first: a crash mid-cut leaves a piece to redo, never a wrong one)."""
    tok_name, doc_name, rec_name = shard_files(k)
    off = np.load(out / doc_name)
    keep = int(np.searchsorted(off[1:], needed, side="left")) + 1
    if keep >= record["documents"]:
        return record
    (out / rec_name).unlink()
    tokens = np.load(out / tok_name, mmap_mode="r")[: int(off[keep])]
    writer = NpyWriter(out / tok_name, tokens.dtype)
    for i in range(0, len(tokens), 1 << 24):  # a bounded copy of the kept prefix
        writer.append(np.array(tokens[i : i + (1 << 24)]))
    size = writer.close()
    return finish_shard(out, k, np.diff(off[: keep + 1]).tolist(), size, int(off[keep]))


def drop_shard(out: Path, k: int) -> None:
    for name in reversed(shard_files(k)):  # the record first
        (out / name).unlink(missing_ok=True)


@dataclass
class Part:
    index: int
    pieces: list[int]
    quota: int | None
    records: dict[int, dict[str, Any]]
    _prefix: int = 0  # pieces[:_prefix] are finished ...
    _prefix_tokens: int = 0  # ... and hold this many tokens

    def advance(self) -> None:
        while self._prefix < len(self.pieces) and self.pieces[self._prefix] in self.records:
            self._prefix_tokens += self.records[self.pieces[self._prefix]]["tokens"]
            self._prefix += 1

    def limit(self) -> int | None:
        """A bound on the tokens any unfinished piece must supply (None: no cap); at most
        0 once the finished prefix reaches the quota."""
        self.advance()
        return None if self.quota is None else self.quota - self._prefix_tokens

    def finalize(self, out: Path) -> dict[str, Any]:
        """Cut the piece that reaches the quota, drop the ones after it; the part's record."""
        kept, tokens, documents = [], 0, 0
        for j, k in enumerate(self.pieces):
            if self.quota is not None and tokens >= self.quota:
                for extra in self.pieces[j:]:
                    drop_shard(out, extra)
                break
            rec = self.records[k]
            if self.quota is not None and rec["tokens"] >= self.quota - tokens:
                rec = self.records[k] = cut_shard(out, k, rec, self.quota - tokens)
            kept.append(k)
            tokens, documents = tokens + rec["tokens"], documents + rec["documents"]
        return {"part": self.index, "pieces": kept, "documents": documents, "tokens": tokens}


def part_quota(max_tokens: int | None, part: int, num_parts: int) -> int | None:
    if max_tokens is None:
        return None
    return max_tokens // num_parts + (part < max_tokens % num_parts)


def merge_parts(out: str | os.PathLike, num_parts: int, log: Callable[[str], None] = print) -> Manifest:
    """Write the manifest of a store whose ``num_parts`` parts are all finished."""
    out = Path(out)
    if not (out / INTENT).is_file():
        raise DataError(f"--out: {str(out)!r} holds no preparation ({INTENT} missing)")
    m = Manifest(**json.loads((out / INTENT).read_text()))
    if m.max_tokens is not None and m.num_parts != num_parts:
        raise DataError(f"--num-shards: {str(out)!r} is prepared in {m.num_parts} parts (its token cap is "
                        f"split over them), not {num_parts}")
    missing = [j for j in range(num_parts) if not (out / part_file(j, num_parts)).is_file()]
    if missing:
        raise DataError(f"--merge: parts {missing} of {num_parts} of {str(out)!r} are not finished; "
                        "run them (--shard i --num-shards K) first")
    pieces = sorted(k for j in range(num_parts)
                    for k in json.loads((out / part_file(j, num_parts)).read_text())["pieces"])
    m.shards = [json.loads((out / shard_files(k)[2]).read_text()) for k in pieces]
    m.num_documents = sum(s["documents"] for s in m.shards)
    m.num_tokens = sum(s["tokens"] for s in m.shards)
    for leftover in [*out.glob("*.tmp.npy"), *out.glob("shard-*.tmp")]:  # of killed workers
        leftover.unlink(missing_ok=True)
    write_json_atomic(out / MANIFEST, m.to_json())  # last: the store is now complete
    log(f"{out}: {m.num_documents:,} documents, {m.num_tokens:,} tokens in {len(m.shards)} shards ({m.dtype})")
    return m
