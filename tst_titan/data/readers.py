"""Stateful document readers: one data-parallel rank's share of a text source.

A reader yields document texts for one data-parallel rank and is ``Stateful``: its
state says exactly which documents were handed out, so a resumed run continues with
the next document. :mod:`tst_titan.data.sources` (the registry of data sources) builds
them; the packing dataset (:mod:`tst_titan.data.loader`) tokenizes what they yield.

Map-style readers (embedded, python_env, local files) shard by document index (rank r
takes documents r, r+W, ...) of a seeded permutation that is redrawn every epoch; they
resume exactly even after looping. Streaming readers (a hub dataset) resume through the
``datasets`` iterable's own state, which is exact within the first epoch only
(torchtitan's behaviour too).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
from torch.distributed.checkpoint.stateful import Stateful

from tst_titan.errors import DataError


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
