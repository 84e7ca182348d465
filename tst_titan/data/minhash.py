"""Near-duplicate signatures for the python_env corpus: one-permutation MinHash over
shingles of ``SHINGLE_TOKENS`` consecutive identifier/number tokens, ``MINHASH_BINS``
bins, all in numpy (no per-token Python). :mod:`tst_titan.data.pycorpus` bands the
signatures for LSH and verifies candidates with :func:`estimated_jaccard`.
"""

from __future__ import annotations

import functools

import numpy as np

SHINGLE_TOKENS = 5
MINHASH_BINS = 64
MAX_TEXT_BYTES = 1_000_000  # the longest text hashed (pycorpus drops larger files first)

_MASK64 = (1 << 64) - 1
_P = np.uint64(0x100000001B3)  # odd: invertible modulo 2**64
_P_INV = np.uint64(pow(0x100000001B3, -1, 1 << 64))
_Q = np.uint64(0x9E3779B97F4A7C15)
ALPHA = np.zeros(256, dtype=bool)
ALPHA[list(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")] = True
_WORD = ALPHA.copy()
_WORD[list(b"0123456789_")] = True


@functools.lru_cache(maxsize=1)
def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P**i and P**-i modulo 2**64 for i < n (uint64 arithmetic wraps)."""
    p = np.full(n, _P, dtype=np.uint64)
    p[0] = 1
    q = np.full(n, _P_INV, dtype=np.uint64)
    q[0] = 1
    return np.cumprod(p, dtype=np.uint64), np.cumprod(q, dtype=np.uint64)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 that spreads every input bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shingles(code: bytes) -> np.ndarray:
    """Sorted unique 64-bit hashes of every ``SHINGLE_TOKENS`` consecutive tokens
    (maximal runs of ``[A-Za-z0-9_]``) of ``code``."""
    a = np.frombuffer(code, dtype=np.uint8)
    w = _WORD[a]
    edges = np.flatnonzero(np.diff(np.concatenate(([False], w, [False])).view(np.int8)))
    starts, ends = edges[0::2], edges[1::2]
    if len(starts) < SHINGLE_TOKENS:
        return np.zeros(0, dtype=np.uint64)
    pw, pinv = _powers(MAX_TEXT_BYTES + 1)
    prefix = np.zeros(len(a) + 1, dtype=np.uint64)
    np.cumsum(a.astype(np.uint64) * pw[: len(a)], out=prefix[1:])
    tok = _mix((prefix[ends] - prefix[starts]) * pinv[starts])  # position-independent
    n = len(tok) - SHINGLE_TOKENS + 1
    sh = np.zeros(n, dtype=np.uint64)
    for j in range(SHINGLE_TOKENS):
        sh = sh * _Q + tok[j : j + n]
    return np.unique(_mix(sh))


EMPTY = np.uint64(_MASK64)  # an empty bin
_BIN_SHIFT = np.uint64(64 - int(np.log2(MINHASH_BINS)))


def signature(sh: np.ndarray) -> np.ndarray:
    """One-permutation MinHash: bin = top bits of the (mixed) shingle hash, value = the
    smallest hash in the bin; ``EMPTY`` for an empty bin. ``sh`` sorted unique."""
    sig = np.full(MINHASH_BINS, EMPTY, dtype=np.uint64)
    if len(sh) == 0:
        return sig
    bins = (sh >> _BIN_SHIFT).astype(np.int64)
    first = np.searchsorted(bins, np.arange(MINHASH_BINS), side="left")
    has = first < len(sh)
    has[has] &= bins[first[has]] == np.arange(MINHASH_BINS)[has]
    sig[has] = sh[first[has]]
    return sig


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Share of bins holding the same minimum among bins non-empty in either signature."""
    used = (a != EMPTY) | (b != EMPTY)
    n = int(used.sum())
    return float(((a == b) & used).sum()) / n if n else 0.0
