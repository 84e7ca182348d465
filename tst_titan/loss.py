"""Multi-hot cross-entropy (MCE) for the superposition phase, and the TST loss.

For logits ``z`` at a position and the next bag ``B = (b_1..b_s)``:

    loss = sum_j w_j * (logsumexp(z) - z[b_j]),   sum_j w_j = 1

Every function here returns a SUM over positions (torchtitan's ``reduction="sum"``
convention); the trainer divides by the global valid weight mass (see
``TSTTrainer.train_step``) so gradient accumulation and data parallelism stay exact.

Two implementations of the same formula:

- plain tensors: :class:`_SharedLSEMultiHotCE`, one logsumexp per position shared by
  all s slots, and a hand-written backward that builds the gradient in ONE buffer of
  the logits' size and dtype (softmax * mass - onehot(w)), never s of them and never
  an fp32 [N, V] copy (row chunks in eager; one fused kernel under torch.compile);
- vocab-sharded DTensor logits (tensor parallel with ``loss_parallel``): one
  ``log_softmax`` and s ``nll_loss`` gathers, the two ops ``loss_parallel`` shards
  along the vocabulary without gathering the logits.

With ``[tst] fused_loss`` the model's output module computes the loss itself
(:mod:`tst_titan.fused_loss`) and hands :class:`TSTLoss` a ``HeadLoss``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torchtitan.tools.logging import logger

from tst_titan.schedule import plan_from_job_config
from torch.distributed.tensor import DTensor
from torchtitan.components.loss import IGNORE_INDEX, cross_entropy_loss

from tst_titan.fused_loss import HeadLoss, multi_hot_logit_grad


def _check_weights(weights: torch.Tensor | None, s: int, device) -> torch.Tensor:
    if weights is None:
        return torch.full((s,), 1.0 / s, dtype=torch.float32, device=device)
    if weights.shape != (s,):
        raise ValueError(f"weights must have shape [{s}], got {list(weights.shape)}")
    return weights.to(device=device, dtype=torch.float32)


def _rows_per_chunk(n_cols: int) -> int:
    """Eager row chunks of about 16M elements: fp32 temporaries of 64 MiB, whatever V."""
    return max(1, (1 << 24) // max(1, n_cols))


class _SharedLSEMultiHotCE(torch.autograd.Function):
    """sum_n sum_j w_j * valid_nj * (lse_n - z[n, t_nj]); returns (loss, per-slot CE sums).

    No fp32 [N, V] buffer is ever built. Eager: the logsumexp and the gradient are
    computed over row chunks, the gradient written chunk by chunk into ONE buffer of the
    logits' dtype. Compiled: one expression per pass (the one-hot weights from
    comparisons against the targets, not a scatter) that inductor fuses into a
    reduction and one pointwise kernel with an output in the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, wv: torch.Tensor):
        # logits [N, V] (any float dtype), targets [N, s] (ignored ones clamped to 0),
        # wv [N, s] fp32 = w_j * valid_nj
        if torch.compiler.is_compiling():
            lse = torch.logsumexp(logits.float(), dim=-1)
        else:
            lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
            step = _rows_per_chunk(logits.shape[1])
            for a in range(0, logits.shape[0], step):
                lse[a : a + step] = torch.logsumexp(logits[a : a + step].float(), dim=-1)
        picked = logits.gather(-1, targets).float()  # [N, s]
        ce = lse.unsqueeze(-1) - picked  # [N, s]
        ctx.save_for_backward(logits, targets, wv, lse)
        valid = wv > 0
        slot_sums = torch.where(valid, ce, torch.zeros_like(ce)).sum(0)
        return (ce * wv).sum(), slot_sums

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_slots: torch.Tensor):
        logits, targets, wv, lse = ctx.saved_tensors
        # d loss / d z = mass_n * softmax(z_n) - sum_j wv_nj * onehot(t_nj)
        wv = wv * grad_loss
        mass = wv.sum(-1, keepdim=True)
        if torch.compiler.is_compiling():
            return multi_hot_logit_grad(logits.float(), lse, targets, wv, mass).to(logits.dtype), None, None
        grad = torch.empty_like(logits)  # the single [N, V] buffer, in the logits' dtype
        step = _rows_per_chunk(logits.shape[1])
        for a in range(0, logits.shape[0], step):
            rows = slice(a, a + step)
            z = logits[rows].float()
            z.sub_(lse[rows].unsqueeze(-1)).exp_().mul_(mass[rows])
            z.scatter_add_(-1, targets[rows], -wv[rows])
            grad[rows] = z
        return grad, None, None


def _multi_hot_ce_with_slots(
    pred: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss_sum, per-slot CE sums [s], per-slot valid counts [s])."""
    s = labels.shape[-1]
    if pred.shape[:-1] != labels.shape[:-1]:
        raise ValueError(
            f"pred {list(pred.shape)} and labels {list(labels.shape)} disagree on positions"
        )
    w = _check_weights(weights, s, labels.device)
    flat_labels = labels.reshape(-1, s)
    valid = flat_labels != ignore_index
    counts = valid.sum(0)

    if isinstance(pred, DTensor):
        # loss_parallel path: log_softmax + nll_loss are sharded along the vocab.
        logp = F.log_softmax(pred.float().flatten(0, -2), dim=-1)
        loss = torch.zeros((), dtype=torch.float32, device=labels.device)
        slot_sums = []
        for j in range(s):
            nll_j = F.nll_loss(
                logp, flat_labels[:, j], reduction="sum", ignore_index=ignore_index
            )
            if isinstance(nll_j, DTensor):
                nll_j = nll_j.full_tensor()
            loss = loss + w[j] * nll_j
            slot_sums.append(nll_j.detach())
        return loss, torch.stack(slot_sums), counts

    logits = pred.reshape(-1, pred.shape[-1])
    targets = torch.where(valid, flat_labels, torch.zeros_like(flat_labels))
    wv = w.unsqueeze(0) * valid.float()
    loss, slot_sums = _SharedLSEMultiHotCE.apply(logits, targets, wv)
    return loss, slot_sums.detach(), counts


def multi_hot_cross_entropy(
    pred: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Multi-hot cross-entropy, summed over positions.

    Args:
        pred: logits ``[..., V]`` (a plain tensor, or a vocab-sharded DTensor under
            ``loss_parallel``).
        labels: token ids ``[..., s]``; entries equal to ``ignore_index`` drop out.
        weights: slot weights ``[s]`` summing to 1; ``None`` means uniform ``1/s``.

    Returns:
        ``sum_positions sum_j w_j * CE(pred, labels[..., j])`` as a float32 scalar.
    """
    return _multi_hot_ce_with_slots(pred, labels, weights, ignore_index)[0]


def valid_weight_mass(
    labels: torch.Tensor, weights: torch.Tensor | None, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """The divisor matching :func:`multi_hot_cross_entropy`: sum of w_j over valid labels.

    With nothing ignored it is the number of positions (not positions x s).
    """
    s = labels.shape[-1]
    w = _check_weights(weights, s, labels.device)
    return ((labels != ignore_index).float() * w).sum()


class TSTLoss:
    """The loss torchtitan's trainer calls as ``loss_fn(pred, labels)``.

    The phase is carried by the labels' rank: labels with one dimension less than the
    logits are next-token labels (torchtitan's own ``cross_entropy_loss``, so a plain
    run is bitwise unchanged); labels of the logits' rank hold a bag per position and
    take the multi-hot loss. Per-slot CE sums of the current step are kept for metrics.
    """

    def __init__(self, weights: torch.Tensor, compile_fn: Callable | None = None):
        self.weights = weights
        self._device_weights: dict[torch.device, torch.Tensor] = {}
        self._mce = _multi_hot_ce_with_slots
        self._ce = cross_entropy_loss
        if compile_fn is not None:
            self._mce = compile_fn(self._mce)
            self._ce = compile_fn(self._ce)
        self.reset_slot_stats()

    def weights_on(self, device: torch.device) -> torch.Tensor:
        """The slot weights on ``device``, copied there once (no host copy per step)."""
        device = torch.device(device)
        w = self._device_weights.get(device)
        if w is None:
            w = self._device_weights[device] = self.weights.to(device=device, dtype=torch.float32)
        return w

    def reset_slot_stats(self) -> None:
        self.slot_sums: torch.Tensor | None = None
        self.slot_counts: torch.Tensor | None = None

    def __call__(self, pred: torch.Tensor | HeadLoss, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(pred, HeadLoss):
            # tst.fused_loss: the model's head already computed the loss (chunked).
            if labels.dim() == 3:  # bags [B, L, s]: keep the per-slot statistics
                self._record(pred.slot_sums, pred.slot_counts)
            return pred.loss_sum
        if labels.dim() == pred.dim() - 1:
            return self._ce(pred, labels)
        if labels.dim() != pred.dim():
            raise ValueError(
                f"labels of rank {labels.dim()} do not fit logits of rank {pred.dim()}"
            )
        if labels.shape[-1] == 1 and self.weights.numel() == 1:
            # s = 1 is next-token prediction: use the identical op for bitwise parity.
            loss = self._ce(pred, labels.squeeze(-1))
            sums, counts = loss.detach().reshape(1), (labels != IGNORE_INDEX).sum().reshape(1)
        else:
            loss, sums, counts = self._mce(pred, labels, self.weights_on(labels.device))
        self._record(sums, counts)
        return loss

    def _record(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        if self.slot_sums is None:
            self.slot_sums, self.slot_counts = sums.float(), counts
        else:
            self.slot_sums = self.slot_sums + sums.float()
            self.slot_counts = self.slot_counts + counts


def build_tst_loss(job_config, **kwargs) -> TSTLoss:
    plan = plan_from_job_config(job_config)
    compile_fn = None
    if job_config.compile.enable and "loss" in job_config.compile.components:
        logger.info("Compiling the TST loss with torch.compile")
        backend = job_config.compile.backend
        compile_fn = lambda fn: torch.compile(fn, backend=backend)  # noqa: E731
    return TSTLoss(plan.slot_weights(), compile_fn=compile_fn)
