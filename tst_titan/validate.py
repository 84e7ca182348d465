"""Next-token validation that reads our held-out data in both phases.

torchtitan's ``Validator`` builds its dataloader from its own dataset registry; this
subclass swaps in :func:`build_validation_dataloader` (embedded / local / hf / store
sources). The model is always evaluated on ordinary token input with the next-token
loss, so validation losses are comparable across phases, bag sizes and runs.

Beside the loss (torchtitan's own computation, unchanged) every pass reports its
**standard error**, ``validation_metrics/loss_se``: sqrt(var / n) of the per-sequence
mean losses of all n validation sequences of all data-parallel ranks. It treats the
sequences as independent; consecutive windows of one document are correlated, so it
is a lower bound, and a difference between two runs on the same held-out set has a
smaller standard error than either loss (the sequences are paired).

Each pass also writes the per-sequence mean losses, in the order this rank read them,
to ``<dump_folder>/validation/step-<step>-rank-<r>.npy`` (float64, a few tens of kB):
the raw material for a standard error clustered by document or file and for paired
differences between runs (:mod:`scripts/bench_quality.py` commits them).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.components.validate import Validator
from torchtitan.tools.logging import logger

from tst_titan.data.loader import build_validation_dataloader
from tst_titan.fused_loss import arm_fused_head


class TSTValidator(Validator):
    def __init__(
        self,
        job_config,
        dp_world_size: int,
        dp_rank: int,
        tokenizer,
        parallel_dims,
        loss_fn,
        validation_context,
        maybe_enable_amp,
        metrics_processor,
        pp_schedule=None,
        pp_has_first_stage=None,
        pp_has_last_stage=None,
    ):
        # Same attributes as Validator.__init__, minus its own dataloader.
        self.job_config = job_config
        self.tokenizer = tokenizer
        self.parallel_dims = parallel_dims
        self.loss_fn = loss_fn
        self.validation_dataloader = build_validation_dataloader(
            dp_world_size, dp_rank, tokenizer, job_config
        )
        self.validation_context = validation_context
        self.maybe_enable_amp = maybe_enable_amp
        self.metrics_processor = metrics_processor
        self.pp_schedule = pp_schedule
        self.pp_has_first_stage = pp_has_first_stage
        self.pp_has_last_stage = pp_has_last_stage
        if job_config.validation.steps == -1:
            logger.warning(
                "validation.steps = -1 reads the whole validation split; ranks with "
                "unequal shares would hang, so prefer a fixed number of steps."
            )

    @torch.no_grad()
    def validate(self, model_parts, step: int) -> None:
        recorder = _PerSequenceLoss(self.loss_fn)
        loss_fn, self.loss_fn = self.loss_fn, recorder
        # Called by TSTMetricsProcessor.log_validation on every rank (a collective).
        self.metrics_processor.set_validation_metrics(lambda: self._standard_error(recorder))
        try:
            super().validate(model_parts, step)
            self._save_sequence_losses(recorder, step)
        finally:
            self.loss_fn = loss_fn
            self.metrics_processor.set_validation_metrics(None)

    def _save_sequence_losses(self, recorder: "_PerSequenceLoss", step: int) -> None:
        # Context parallel: each rank holds a part of every sequence, nothing to save.
        if recorder.unavailable or not recorder.sums or self.parallel_dims.cp_enabled:
            return
        sums = torch.stack(recorder.sums).cpu().double()
        counts = torch.cat(recorder.counts).cpu().double()
        rank = dist.get_rank() if dist.is_initialized() else 0
        folder = os.path.join(self.job_config.job.dump_folder, "validation")
        os.makedirs(folder, exist_ok=True)
        means = (sums / counts.clamp(min=1)).numpy()
        np.save(os.path.join(folder, f"step-{step}-rank-{rank}.npy"), means)

    def _standard_error(self, recorder: "_PerSequenceLoss") -> dict[str, float]:
        if recorder.unavailable:  # tst.fused_loss: the head returned only the batch's sum
            if not getattr(self, "_warned_se", False):
                logger.warning("validation_metrics/loss_se: not available with tst.fused_loss")
                self._warned_se = True
            return {}
        pd = self.parallel_dims
        n, se = sequence_standard_error(
            recorder.sums, recorder.counts,
            cp_mesh=pd.get_optional_mesh("cp") if pd.cp_enabled else None,
            dp_mesh=pd.get_optional_mesh("batch") if pd.dp_enabled else None,
        )
        if n < 2:
            return {}
        logger.info(f"validation loss standard error: {se:.4f} ({n:,} sequences)")
        return {"validation_metrics/loss_se": se}

    def post_dataloading_process(self, input_dict, labels, model_parts):
        out = super().post_dataloading_process(input_dict, labels, model_parts)
        arm_fused_head(model_parts[0], out[1])  # tst.fused_loss: the head returns the loss
        return out


def build_tst_validator(**kwargs) -> TSTValidator:
    """TrainSpec ``build_validator_fn``."""
    return TSTValidator(**kwargs)


class _PerSequenceLoss:
    """The validator's loss function, returning exactly what it returns, that also
    records each sequence's loss sum and valid-label count (one more loss call per
    sequence, on a view of the same logits)."""

    def __init__(self, loss_fn):
        self.loss_fn = loss_fn
        self.sums: list[torch.Tensor] = []
        self.counts: list[torch.Tensor] = []
        self.unavailable = False

    def __call__(self, pred, labels: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(pred, labels)
        if not isinstance(pred, torch.Tensor):  # a HeadLoss (tst.fused_loss): no per-row values
            self.unavailable = True
            return loss
        for i in range(labels.shape[0]):
            row = self.loss_fn(pred[i : i + 1], labels[i : i + 1]).detach()
            if isinstance(row, DTensor):  # loss parallel
                row = row.full_tensor()
            self.sums.append(row.double().reshape(()))
        self.counts.append((labels != IGNORE_INDEX).flatten(1).sum(1).double())
        return loss


def sequence_standard_error(
    sums: list[torch.Tensor], counts: list[torch.Tensor], cp_mesh=None, dp_mesh=None
) -> tuple[int, float]:
    """(n, sqrt(var / n)) of the per-sequence mean losses ``sum / count`` of every
    sequence of every data-parallel rank (sample variance, ddof = 1; NaN for n < 2).

    ``sums`` holds one scalar per local sequence, ``counts`` the valid labels per
    sequence (any grouping). Context-parallel ranks hold parts of the same sequences,
    so their sums and counts are added first; data-parallel ranks then add their
    (n, sum x, sum x^2). Sequences without a valid label are left out.
    """
    device = counts[0].device if counts else "cpu"
    s = torch.stack(sums).to(device) if sums else torch.zeros(0, dtype=torch.float64)
    c = torch.cat(counts).to(device) if counts else torch.zeros(0, dtype=torch.float64)
    if cp_mesh is not None:
        both = torch.stack([s, c])
        dist.all_reduce(both, group=cp_mesh.get_group())
        s, c = both[0], both[1]
    x = s[c > 0] / c[c > 0]
    stats = torch.stack([torch.tensor(float(len(x)), dtype=torch.float64, device=x.device), x.sum(), (x * x).sum()])
    if dp_mesh is not None:
        dist.all_reduce(stats, group=dp_mesh.get_group())
    n, total, total_sq = (float(v) for v in stats.cpu())
    if n < 2:
        return int(n), math.nan
    var = max(total_sq - total * total / n, 0.0) / (n - 1)
    return int(n), math.sqrt(var / n)
