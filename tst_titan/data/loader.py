"""The phase-aware packing dataset and torchtitan dataloaders built on it.

One continuous token stream per data-parallel rank: documents with BOS/EOS (as
torchtitan tokenizes them), concatenated. Each sample cuts the next window off the
front of the stream: ``s*(L+1)`` tokens in the superposition phase (inputs and labels
``[L, s]``), ``L+1`` tokens in the next-token phase (inputs and labels ``[L]``).
Consecutive windows are adjacent, so no stream token is dropped or served twice,
across the switch too.

Two kinds of stream feed it: :class:`TextStream` tokenizes the documents of a text
source in the loop (embedded, python_env, local, hf), :class:`tst_titan.data.store.StoreStream`
reads a pre-tokenized token store (``training.dataset = "store"``) from memory maps.
Which one a ``dataset`` kind gives is the registry's answer (:mod:`tst_titan.data.sources`).

The phase of a sample comes from :meth:`TSTPlan.phase` of the step the sample
belongs to, ``samples_served // samples_per_step + 1`` (samples_per_step = local
batch size x gradient accumulation steps), so the dataset needs no message from the
trainer and its checkpointed state (stream state, samples served) fully determines
what comes next.

Dataloader workers: StatefulDataLoader takes batch ``j`` from worker ``j % W``. Every
worker walks the whole stream and materialises only its own batches, so 0, 1 or W
workers serve the identical stream and every worker's checkpointed state is exact. On
a token store skipping a window is O(1), so workers multiply the loading rate; a text
stream must still tokenize what it skips, so there workers only overlap loading with
compute (prepare a store to load faster).
"""

from __future__ import annotations

import pickle
from dataclasses import asdict
from typing import Any, Iterator

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset, get_worker_info
from torchtitan.components.dataloader import ParallelAwareDataloader

from tst_titan.data.sources import SourceSpec, open_reader
from tst_titan.errors import CheckpointMismatchError
from tst_titan.schedule import Phase, TSTPlan, plan_from_job_config


class TextStream(Stateful):
    """Tokens of a text source's documents, tokenized as they are needed.

    State: the source's position plus the tokens already tokenized but not yet served.
    """

    def __init__(self, source: Stateful, tokenizer):
        self.source, self._tokenizer = source, tokenizer
        self._docs: Iterator[str] | None = None
        self._buffer = np.zeros(0, dtype=np.int64)

    def take(self, n: int, keep: bool = True) -> np.ndarray | None:
        """The next ``n`` tokens (an empty array if not ``keep``); None when the source
        is exhausted first."""
        if self._docs is None:
            self._docs = iter(self.source)
        pieces, have = [self._buffer], self._buffer.size
        while have < n:
            try:
                text = next(self._docs)
            except StopIteration:
                self._buffer = np.concatenate(pieces)
                return None
            ids = np.asarray(self._tokenizer.encode(text, add_bos=True, add_eos=True), dtype=np.int64)
            pieces.append(ids)
            have += ids.size
        buf = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
        window, self._buffer = buf[:n], buf[n:]
        return window if keep else window[:0]

    def restart(self, source_state: dict[str, Any]) -> None:
        self.source.load_state_dict(source_state)
        self._docs, self._buffer = None, np.zeros(0, dtype=np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {"source": self.source.state_dict(), "buffer": self._buffer.tolist()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.source.load_state_dict(state_dict["source"])
        self._docs, self._buffer = None, np.asarray(state_dict["buffer"], dtype=np.int64)


class TSTPackedDataset(IterableDataset, Stateful):
    """Phase-aware windows of one rank's stream (see the module docstring).

    ``source`` is a text source (with ``tokenizer``) or a ready token stream such as
    :class:`~tst_titan.data.store.StoreStream` (``tokenizer=None``). ``batch_size`` is
    the dataloader's batch size, which tells worker ``k`` of ``W`` which samples are its
    own (those of batches k, k+W, ...).
    """

    def __init__(
        self,
        source: Stateful,
        tokenizer,
        plan: TSTPlan,
        samples_per_step: int,
        restart_each_iter: bool = False,
        batch_size: int = 1,
    ):
        self._source = source
        self._stream = TextStream(source, tokenizer) if tokenizer is not None else source
        self.plan = plan
        self.samples_per_step = samples_per_step
        self.batch_size = batch_size
        self._restart = restart_each_iter
        self._initial_state = self._stream.state_dict() if restart_each_iter else None
        self.samples_served = 0
        self.tokens_consumed = 0

    @property
    def source(self) -> Stateful:
        """What the windows are cut from: a text source or a token stream (for the
        trainer's data budget)."""
        return self._source

    def phase_of_next_sample(self) -> Phase:
        return self.plan.phase(self.samples_served // self.samples_per_step + 1)

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        if self._restart:
            self._stream.load_state_dict(self._initial_state)
            self.samples_served, self.tokens_consumed = 0, 0
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        while True:
            phase = self.phase_of_next_sample()
            need = self.plan.window_len(phase)
            mine = (self.samples_served // self.batch_size) % workers == worker
            window = self._stream.take(need, keep=mine)
            if window is None:
                return  # a non-looping stream ran out
            self.samples_served += 1
            self.tokens_consumed += need
            if mine:
                inputs, labels = self.plan.split_window(torch.from_numpy(window.astype(np.int64)), phase)
                yield {"input": inputs}, labels

    def _fingerprint(self) -> dict[str, Any]:
        p = self.plan
        return {
            "bag_size": p.bag_size,
            "switch_step": p.switch_step,
            "seq_len": p.seq_len,
            "mode": p.mode,
            "samples_per_step": self.samples_per_step,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "stream": self._stream.state_dict(),
            "samples_served": self.samples_served,
            "tokens_consumed": self.tokens_consumed,
            "plan": self._fingerprint(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved, now = state_dict.get("plan"), self._fingerprint()
        if saved is not None and saved != now:
            diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
            raise CheckpointMismatchError(
                "checkpoint was written with a different data plan "
                + ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
            )
        self._stream.load_state_dict(state_dict["stream"])
        self.samples_served = int(state_dict["samples_served"])
        self.tokens_consumed = int(state_dict.get("tokens_consumed", 0))


class TSTDataLoader(ParallelAwareDataloader):
    """torchtitan's dataloader (per-rank state in DCP), refusing a changed DP degree or
    worker count clearly (both decide which rank and worker holds which stream state)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("world_size") if state_dict else None
        if saved is not None and saved != self.dp_world_size:
            raise CheckpointMismatchError(
                f"checkpoint was written with data-parallel degree {saved}, this run has "
                f"{self.dp_world_size}; resume with the same degree (each rank's data "
                "stream is part of the checkpoint and cannot be re-split)"
            )
        mine = state_dict.get(self._rank_id) if state_dict else None
        if mine is not None:
            saved_state = pickle.loads(mine)
            # torchdata keeps the worker count in the multi-process snapshot only
            snap = saved_state.get("_snapshot", {}).get("_main_snapshot", saved_state)
            workers = snap.get("_num_workers", 0)
            if workers != self.num_workers:
                raise CheckpointMismatchError(
                    f"checkpoint was written with training.dataloader.num_workers = {workers}, "
                    f"this run has {self.num_workers}; resume with the same value (each "
                    "worker's stream position is part of the checkpoint)"
                )
        super().load_state_dict(state_dict)


def samples_per_step(job_config, dp_world_size: int) -> int:
    """Samples one data-parallel rank serves per optimizer step (local batch x grad accum)."""
    local_bs = job_config.training.local_batch_size
    global_bs = job_config.training.global_batch_size
    if global_bs < 0:
        global_bs = local_bs * dp_world_size
    return global_bs // dp_world_size


def build_stream(
    kind: str, path: str | None, split: str, dp_rank: int, dp_world_size: int, tokenizer,
    data_cfg, loop: bool, key_prefix: str = "training",
) -> tuple[Stateful, Any]:
    """(reader of one rank, tokenizer to tokenize it with: None for a token store), from
    the registry of data sources (:mod:`tst_titan.data.sources`)."""
    spec = SourceSpec.from_config(kind, path, split, data_cfg, key_prefix)
    reader, text = open_reader(spec, dp_rank, dp_world_size, seed=data_cfg.shuffle_seed, loop=loop,
                               tokenizer_dir=getattr(tokenizer, "tokenizer_path", None))
    return reader, tokenizer if text else None


def _loader_kwargs(dl_cfg, batch_size: int) -> dict[str, Any]:
    kwargs = {**asdict(dl_cfg), "batch_size": batch_size}
    if not torch.cuda.is_available():
        kwargs["pin_memory"] = False  # pinned host memory only helps copies to a GPU
    return kwargs


def build_tst_dataloader(
    dp_world_size: int, dp_rank: int, tokenizer, job_config
) -> ParallelAwareDataloader:
    """TrainSpec ``build_dataloader_fn``: the training stream, both phases."""
    t = job_config.training
    source, tok = build_stream(t.dataset, t.dataset_path, "train", dp_rank, dp_world_size,
                               tokenizer, job_config.data, loop=True)
    dataset = TSTPackedDataset(
        source,
        tok,
        plan_from_job_config(job_config),
        samples_per_step(job_config, dp_world_size),
        batch_size=t.local_batch_size,
    )
    return TSTDataLoader(
        dataset,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        **_loader_kwargs(t.dataloader, t.local_batch_size),
    )


def build_validation_dataloader(
    dp_world_size: int, dp_rank: int, tokenizer, job_config
) -> ParallelAwareDataloader:
    """Next-token batches of held-out data; every validation pass reads the same batches."""
    v = job_config.validation
    source, tok = build_stream(v.dataset, v.dataset_path, "validation", dp_rank, dp_world_size,
                               tokenizer, job_config.data, loop=v.steps != -1,
                               key_prefix="validation")
    plan = TSTPlan(bag_size=1, switch_step=0, total_steps=0, seq_len=v.seq_len)
    dataset = TSTPackedDataset(source, tok, plan, samples_per_step=1, restart_each_iter=True,
                               batch_size=v.local_batch_size)
    return ParallelAwareDataloader(
        dataset,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        **_loader_kwargs(v.dataloader, v.local_batch_size),
    )
