"""The phase-aware packing dataset and torchtitan dataloaders built on it.

One continuous token stream per data-parallel rank: documents from a source,
tokenized with BOS/EOS (as torchtitan does) and concatenated. Each sample cuts the
next window off the front of the stream: ``s*(L+1)`` tokens in the superposition
phase (inputs and labels ``[L, s]``), ``L+1`` tokens in the next-token phase (inputs
and labels ``[L]``). Consecutive windows are adjacent, so no stream token is dropped
or served twice, across the switch too.

The phase of a sample comes from :meth:`TSTPlan.phase` of the step the sample
belongs to, ``samples_served // samples_per_step + 1`` (samples_per_step = local
batch size x gradient accumulation steps), so the dataset needs no message from the
trainer and its checkpointed state (source position, leftover tokens, samples
served) fully determines what comes next.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Iterator

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset
from torchtitan.components.dataloader import ParallelAwareDataloader

from tst_titan.data.sources import build_source
from tst_titan.schedule import Phase, TSTPlan, plan_from_job_config


class CheckpointMismatchError(RuntimeError):
    """A checkpoint written under a different TST plan than the current config."""


class TSTPackedDataset(IterableDataset, Stateful):
    def __init__(
        self,
        source: Stateful,
        tokenizer,
        plan: TSTPlan,
        samples_per_step: int,
        restart_each_iter: bool = False,
    ):
        self._source = source
        self._tokenizer = tokenizer
        self.plan = plan
        self.samples_per_step = samples_per_step
        self._restart = restart_each_iter
        self._initial_source_state = source.state_dict() if restart_each_iter else None
        self._buffer: list[int] = []
        self._offset = 0
        self.samples_served = 0
        self.tokens_consumed = 0

    def phase_of_next_sample(self) -> Phase:
        return self.plan.phase(self.samples_served // self.samples_per_step + 1)

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        if self._restart:
            self._source.load_state_dict(self._initial_source_state)
            self._buffer, self._offset, self.samples_served, self.tokens_consumed = [], 0, 0, 0
        docs = iter(self._source)
        while True:
            phase = self.phase_of_next_sample()
            need = self.plan.window_len(phase)
            while len(self._buffer) - self._offset < need:
                try:
                    text = next(docs)
                except StopIteration:
                    return
                ids = self._tokenizer.encode(text, add_bos=True, add_eos=True)
                self._buffer = self._buffer[self._offset :] + ids
                self._offset = 0
            window = torch.tensor(
                self._buffer[self._offset : self._offset + need], dtype=torch.long
            )
            self._offset += need
            self.samples_served += 1
            self.tokens_consumed += need
            inputs, labels = self.plan.split_window(window, phase)
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
            "source": self._source.state_dict(),
            "buffer": self._buffer[self._offset :],
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
        self._source.load_state_dict(state_dict["source"])
        self._buffer = list(state_dict["buffer"])
        self._offset = 0
        self.samples_served = int(state_dict["samples_served"])
        self.tokens_consumed = int(state_dict.get("tokens_consumed", 0))


class TSTDataLoader(ParallelAwareDataloader):
    """torchtitan's dataloader (per-rank state in DCP), refusing a changed DP degree clearly."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("world_size") if state_dict else None
        if saved is not None and saved != self.dp_world_size:
            raise CheckpointMismatchError(
                f"checkpoint was written with data-parallel degree {saved}, this run has "
                f"{self.dp_world_size}; resume with the same degree (each rank's data "
                "stream is part of the checkpoint and cannot be re-split)"
            )
        super().load_state_dict(state_dict)


def samples_per_step(job_config, dp_world_size: int) -> int:
    """Samples one data-parallel rank serves per optimizer step (local batch x grad accum)."""
    local_bs = job_config.training.local_batch_size
    global_bs = job_config.training.global_batch_size
    if global_bs < 0:
        global_bs = local_bs * dp_world_size
    return global_bs // dp_world_size


def build_tst_dataloader(
    dp_world_size: int, dp_rank: int, tokenizer, job_config
) -> ParallelAwareDataloader:
    """TrainSpec ``build_dataloader_fn``: the training stream, both phases."""
    source = build_source(
        job_config.training.dataset,
        job_config.training.dataset_path,
        "train",
        dp_rank,
        dp_world_size,
        job_config.data,
        loop=True,
    )
    dataset = TSTPackedDataset(
        source,
        tokenizer,
        plan_from_job_config(job_config),
        samples_per_step(job_config, dp_world_size),
    )
    return TSTDataLoader(
        dataset,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        **{**asdict(job_config.training.dataloader), "batch_size": job_config.training.local_batch_size},
    )


def build_validation_dataloader(
    dp_world_size: int, dp_rank: int, tokenizer, job_config
) -> ParallelAwareDataloader:
    """Next-token batches of held-out data; every validation pass reads the same batches."""
    v = job_config.validation
    source = build_source(
        v.dataset,
        v.dataset_path,
        "validation",
        dp_rank,
        dp_world_size,
        job_config.data,
        loop=v.steps != -1,
        key_prefix="validation",
    )
    plan = TSTPlan(bag_size=1, switch_step=0, total_steps=0, seq_len=v.seq_len)
    dataset = TSTPackedDataset(source, tokenizer, plan, samples_per_step=1, restart_each_iter=True)
    return ParallelAwareDataloader(
        dataset,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        **{**asdict(v.dataloader), "batch_size": v.local_batch_size},
    )
