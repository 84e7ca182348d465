"""The TST schedule: the one place that decides which phase a step is in.

Steps 1..switch_step are the superposition phase (phase 1), every later step is
next-token training (phase 2). The dataloader derives the step of each sample from
the number of samples it has served, the trainer from its step counter, and both ask
:meth:`TSTPlan.phase` -- so the model input, the loss and the packing cannot disagree.

This module also owns the packing arithmetic: how many stream tokens one sample
consumes in each phase and mode, and how a window is cut into inputs and labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

MODES = ("full", "input_only", "output_only")
WEIGHTINGS = ("uniform", "power_law")
AT_SWITCH = ("continue", "reset_optimizer")


class Phase(IntEnum):
    SUPERPOSITION = 1
    NEXT_TOKEN = 2


@dataclass(frozen=True)
class TSTPlan:
    """Everything the components need to agree on; built once from the JobConfig."""

    bag_size: int
    switch_step: int
    total_steps: int
    seq_len: int
    mode: str = "full"
    bag_weighting: str = "uniform"
    at_switch: str = "continue"

    @property
    def enabled(self) -> bool:
        return self.switch_step > 0

    def phase(self, step: int) -> Phase:
        """Phase of a 1-based training step."""
        return Phase.SUPERPOSITION if 1 <= step <= self.switch_step else Phase.NEXT_TOKEN

    def is_switch_step(self, step: int) -> bool:
        """True for the first next-token step after a superposition phase."""
        return self.enabled and step == self.switch_step + 1

    # -- packing ---------------------------------------------------------------
    def window_len(self, phase: Phase) -> int:
        """Stream tokens consumed by one sample (inputs plus trailing label tokens)."""
        s, L = self.bag_size, self.seq_len
        if phase == Phase.NEXT_TOKEN:
            return L + 1
        if self.mode == "full":
            return s * (L + 1)
        if self.mode == "input_only":
            return s * L + 1
        return L + s  # output_only

    def split_window(
        self, window: torch.Tensor, phase: Phase
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cut one window of ``window_len(phase)`` tokens into (input, labels).

        - next-token:  input [L],    labels [L]    (labels = input shifted by one)
        - full:        input [L, s], labels [L, s] (row i = bag i, label row i = bag i+1)
        - input_only:  input [L, s], labels [L]    (the token after bag i)
        - output_only: input [L],    labels [L, s] (the s tokens after token i)
        """
        s, L = self.bag_size, self.seq_len
        assert window.numel() == self.window_len(phase), (window.numel(), phase)
        if phase == Phase.NEXT_TOKEN:
            return window[:L], window[1:]
        if self.mode == "full":
            return window[: s * L].view(L, s), window[s:].view(L, s)
        if self.mode == "input_only":
            return window[: s * L].view(L, s), window[s::s]
        return window[:L], window.unfold(0, s, 1)[1 : L + 1]

    def data_tokens_per_sample(self, phase: Phase) -> int:
        """Stream tokens a sample feeds to the model (what ``n_tokens_seen`` counts)."""
        if phase == Phase.NEXT_TOKEN or self.mode == "output_only":
            return self.seq_len
        return self.bag_size * self.seq_len

    def slot_weights(self) -> torch.Tensor:
        """Weights w_j (summing to 1) of the multi-hot loss's s slots."""
        s = self.bag_size
        if self.bag_weighting == "power_law":
            w = 1.0 / torch.arange(1, s + 1, dtype=torch.float64)
        else:
            w = torch.ones(s, dtype=torch.float64)
        return (w / w.sum()).float()

    def describe(self, samples_per_step: int, dp_degree: int) -> str:
        """A one-paragraph plan for the log: steps, sequences and data tokens per phase."""
        p1, p2 = self.switch_step, self.total_steps - self.switch_step
        seqs = samples_per_step * dp_degree
        t1 = p1 * seqs * self.data_tokens_per_sample(Phase.SUPERPOSITION)
        t2 = p2 * seqs * self.data_tokens_per_sample(Phase.NEXT_TOKEN)
        if not self.enabled:
            return (
                f"TST off: {p2} next-token steps, {p2 * seqs:,} sequences, "
                f"{t2:,} data tokens"
            )
        return (
            f"TST plan: phase 1 (superposition, s={self.bag_size}, mode={self.mode}, "
            f"weights={self.bag_weighting}) steps 1-{p1}: {p1 * seqs:,} sequences, "
            f"{t1:,} data tokens; phase 2 (next-token) steps {p1 + 1}-{self.total_steps}: "
            f"{p2 * seqs:,} sequences, {t2:,} data tokens; total {t1 + t2:,} data tokens "
            f"({(t1 + t2) / max(1, (p1 + p2) * seqs * self.seq_len):.2f}x a plain run); "
            f"at switch: {self.at_switch}"
        )


def resolve_switch_step(tst_cfg, total_steps: int) -> int:
    """Number of phase-1 steps from the ``[tst]`` section (0 when TST is off)."""
    if not tst_cfg.enable:
        return 0
    if tst_cfg.switch_step is not None:
        return int(tst_cfg.switch_step)
    ratio = 0.3 if tst_cfg.superposition_ratio is None else tst_cfg.superposition_ratio
    return int(round(ratio * total_steps))


def plan_from_job_config(job_config) -> TSTPlan:
    tst = job_config.tst
    return TSTPlan(
        bag_size=int(tst.bag_size),
        switch_step=resolve_switch_step(tst, job_config.training.steps),
        total_steps=int(job_config.training.steps),
        seq_len=int(job_config.training.seq_len),
        mode=tst.mode,
        bag_weighting=tst.bag_weighting,
        at_switch=tst.at_switch,
    )
