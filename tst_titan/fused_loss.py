"""Fused output projection + multi-hot loss over row chunks (``[tst] fused_loss``).

The stock path materialises the ``[N, V]`` logits (and fp32 copies of them) before
the loss; at the 270M microbatch that is the largest activation of the step. Here the
model's ``output`` module computes the loss itself, ``chunk_size`` rows at a time:

- forward, per chunk: ``logits = h_c @ W.T`` in the compute dtype (bf16 under FSDP
  mixed precision), the fp32 logsumexp and the s target logits; and, when gradients
  are needed, the chunk's logit gradient ``G_c = softmax * mass - sum_j w_j onehot(t_j)``
  (in the compute dtype) and its two matmuls, ``dH_c = G_c @ W`` and
  ``dW += G_c.T @ h_c``, both with fp32 results (no per-chunk bf16 rounding of
  ``dW``). The chunk's logits are then freed.
- backward: scales the stored fp32 ``dH`` and ``dW`` by the incoming scalar gradient
  in fp32 and casts each once, to the input's and the parameter's dtype.

"When gradients are needed" is decided before the autograd Function, from
``torch.is_grad_enabled()`` and the inputs' ``requires_grad``: under ``no_grad`` /
``inference_mode`` (validation) the head runs one ``N x V x D`` matmul and allocates
no gradient buffers (inside ``Function.forward`` grad mode is always off, and
``ctx.needs_input_grad`` stays true under ``no_grad`` for a weight that requires grad).

Computing the head's gradients during the forward (as Liger's fused linear
cross-entropy and torchtitan main's ``ChunkedLossWrapper`` do) costs the stock three
``N x V x D`` matmuls; recomputing the logits in the backward would add a fourth.
The loss is a scalar, so its upstream gradient is one number and the early gradient
is exact.

FSDP2: the head is torchtitan's own ``output`` module (same parameter, same FQN),
called once per microbatch, so its pre-forward hook unshards the weight for the
whole chunk loop and its backward hooks reduce the gradient as usual.

The contract, in three calls (torchtitan's ``forward_backward_step`` gives the loss
function the model's output, so the labels reach the head beforehand):

1. ``parallelize.py`` calls :func:`install_fused_head` before FSDP wraps the model;
2. the trainer's and the validator's ``post_dataloading_process`` call
   :func:`arm_fused_head` with the microbatch's labels (and slot weights) right before
   the model forward; the armed head returns a :class:`HeadLoss` once, then disarms;
3. :class:`tst_titan.loss.TSTLoss` turns a :class:`HeadLoss` into the loss.

An unarmed head is a plain ``nn.Linear``, so export, evaluation and any other caller
see logits.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.tools.logging import logger

DEFAULT_CHUNK_SIZE = 1024


class HeadLoss(NamedTuple):
    """What an armed :class:`FusedLossHead` returns instead of logits."""

    loss_sum: torch.Tensor  # fp32 scalar, differentiable: sum_n sum_j w_j CE_nj
    slot_sums: torch.Tensor  # [s] fp32 per-slot CE sums over valid labels (detached)
    slot_counts: torch.Tensor  # [s] int64 valid labels per slot


def chunk_step(
    h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, wv: torch.Tensor, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One row chunk: (lse [c] fp32, target logits [c, s] fp32, and with ``with_grad``
    the chunk's logit gradient ``G_c`` [c, V] for a unit upstream gradient, in the
    compute dtype). ``h`` [c, D] and ``w`` [V, D] are in the compute dtype.

    Eager: in-place softmax and a ``scatter_add`` of the slot weights (one fp32
    [c, V] buffer). Compiled: the one-hot weights come from comparisons against the
    targets, so inductor fuses the whole logit gradient into one kernel with a
    compute-dtype output.
    """
    logits = h @ w.t()  # fp32 accumulation inside the GEMM
    z = logits.float()
    del logits
    lse = torch.logsumexp(z, dim=-1)
    picked = z.gather(1, targets)
    if not with_grad:
        return lse, picked, None
    mass = wv.sum(-1, keepdim=True)
    if torch.compiler.is_compiling():
        g = multi_hot_logit_grad(z, lse, targets, wv, mass).to(h.dtype)
    else:
        z.sub_(lse.unsqueeze(-1)).exp_().mul_(mass)
        z.scatter_add_(1, targets, -wv)
        g = z.to(h.dtype)
    del z
    return lse, picked, g


def multi_hot_logit_grad(
    z: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, wv: torch.Tensor, mass: torch.Tensor
) -> torch.Tensor:
    """``softmax(z) * mass - sum_j wv_j * onehot(t_j)`` as one pointwise expression
    (compare against the targets, no scatter): inductor fuses it into one kernel."""
    ids = torch.arange(z.shape[-1], device=z.device)
    hot = torch.zeros((), dtype=torch.float32, device=z.device)
    for j in range(targets.shape[-1]):
        hot = hot + torch.where(targets[:, j : j + 1] == ids, wv[:, j : j + 1], 0.0)
    return torch.exp(z - lse.unsqueeze(-1)) * mass - hot


@functools.lru_cache(maxsize=None)
def fp32_out_gemm(device: str, dtype: torch.dtype) -> bool:
    """Whether this build multiplies ``dtype`` matrices straight into an fp32 output
    (``torch.mm`` / ``torch.addmm`` with ``out_dtype``): CUDA builds of recent torch;
    torch 2.13 has no CPU kernel. Probed once per device and dtype."""
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device)
        acc = torch.ones(2, 2, dtype=torch.float32, device=device)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        out = torch.empty(2, 2, dtype=torch.float32, device=device)
        torch.mm(a, a, out_dtype=torch.float32, out=out)
        return bool((acc == 3).all() and (out == 2).all())
    except (RuntimeError, NotImplementedError, TypeError):
        if not device.startswith("cpu"):
            logger.warning(
                f"tst.fused_loss: no {dtype} GEMM with fp32 output on {device} in torch "
                f"{torch.__version__}; the head's gradient matmuls run in fp32 (slower)"
            )
        return False


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out = a @ b``, summed and stored in ``out``'s dtype (fp32): never rounded to ``a``'s."""
    if a.dtype == out.dtype:
        torch.mm(a, b, out=out)
    else:
        torch.mm(a, b, out_dtype=out.dtype, out=out)


def _addmm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` in ``acc``'s dtype (fp32), the product never rounded to ``a``'s."""
    if a.dtype == acc.dtype:
        torch.addmm(acc, a, b, out=acc)
    else:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)


def chunked_loss(
    h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, wv: torch.Tensor, compute_dtype: torch.dtype,
    chunk_size: int, step_fn: Callable, need_h: bool, need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The chunk loop: (loss, slot sums, dloss/dh, dloss/dW); the gradients are fp32 and
    only computed (and allocated) for ``need_h`` / ``need_w``. With neither, one
    ``N x V x D`` matmul, the logsumexp and the target gathers: the forward-only path.

    The gradient products ``G_c @ W`` and ``G_c.T @ h_c`` take compute-dtype operands
    and keep fp32 results: fp32-output GEMMs where the build has them (CUDA), else the
    same products from fp32 copies of the compute-dtype values (CPU: an fp32 matmul,
    the same sums up to summation order). ``dW`` is accumulated over chunks in fp32.
    """
    n, s = targets.shape
    dev = h.device
    hc, wc = h.to(compute_dtype), w.to(compute_dtype)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    picked = torch.empty(n, s, dtype=torch.float32, device=dev)
    with_grad = need_h or need_w
    grad_h = torch.empty(h.shape, dtype=torch.float32, device=dev) if need_h else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=dev) if need_w else None
    upcast = with_grad and compute_dtype != torch.float32 and not fp32_out_gemm(str(dev), compute_dtype)
    w_dh = wc.float() if upcast and need_h else wc
    with torch.autocast(dev.type, enabled=False):
        for start in range(0, n, chunk_size):
            rows = slice(start, min(n, start + chunk_size))
            lse[rows], picked[rows], g = step_fn(hc[rows], wc, targets[rows], wv[rows], with_grad)
            if g is None:
                continue
            if upcast:
                g = g.float()  # exact: every compute-dtype value is an fp32 value
            if need_h:
                _mm_into(grad_h[rows], g, w_dh)
            if need_w:
                _addmm_into(grad_w, g.t(), hc[rows].float() if upcast else hc[rows])
            del g
    ce = lse.unsqueeze(-1) - picked
    loss = (ce * wv).sum()
    slot_sums = torch.where(wv > 0, ce, torch.zeros_like(ce)).sum(0)
    return loss, slot_sums, grad_h, grad_w


class _ChunkedLinearMultiHotCE(torch.autograd.Function):
    """loss = sum_n sum_j wv_nj (lse(h_n W^T) - (h_n W^T)[t_nj]), never more than one
    chunk of logits alive; returns (loss, per-slot CE sums). Only applied when a
    gradient is needed (``need_h`` / ``need_w``, decided by the caller: inside
    ``forward`` grad mode is always off and ``needs_input_grad`` ignores no_grad)."""

    @staticmethod
    def forward(ctx, h, w, targets, wv, compute_dtype, chunk_size, step_fn, need_h, need_w):
        loss, slot_sums, grad_h, grad_w = chunked_loss(
            h, w, targets, wv, compute_dtype, chunk_size, step_fn, need_h, need_w)
        ctx.mark_non_differentiable(slot_sums)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, w.dtype)
        return loss, slot_sums

    @staticmethod
    def backward(ctx, grad_loss, grad_slots):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        scale = grad_loss.float()  # the upstream scalar in fp32, one rounding per gradient
        dh = None if grad_h is None else (grad_h * scale).to(h_dtype)
        dw = None if grad_w is None else (grad_w * scale).to(w_dtype)
        return dh, dw, None, None, None, None, None, None, None


def fused_linear_multi_hot_ce(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    slot_weights: torch.Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    step_fn: Callable = chunk_step,
    ignore_index: int = IGNORE_INDEX,
) -> HeadLoss:
    """Output projection + multi-hot CE (a SUM over positions), chunked over rows.

    Args:
        h: hidden states ``[..., D]`` (the final norm's output).
        weight: the output projection ``[V, D]``.
        labels: next-token ids ``[...]`` (s = 1: plain cross-entropy) or bags
            ``[..., s]``; ``ignore_index`` entries drop out.
        slot_weights: ``[s]`` summing to 1 (``None``: uniform).
    """
    if labels.dim() == h.dim() - 1:
        labels = labels.unsqueeze(-1)
    if labels.shape[:-1] != h.shape[:-1]:
        raise ValueError(f"hidden {list(h.shape)} and labels {list(labels.shape)} disagree on positions")
    s = labels.shape[-1]
    if slot_weights is None:
        slot_weights = torch.full((s,), 1.0 / s, dtype=torch.float32, device=h.device)
    elif slot_weights.shape != (s,):
        raise ValueError(f"slot weights must have shape [{s}], got {list(slot_weights.shape)}")
    flat = labels.reshape(-1, s)
    valid = flat != ignore_index
    targets = torch.where(valid, flat, torch.zeros_like(flat))
    wv = slot_weights.to(device=h.device, dtype=torch.float32).unsqueeze(0) * valid
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        compute_dtype = torch.get_autocast_dtype(dev)
    else:
        compute_dtype = weight.dtype
    flat_h = h.reshape(-1, h.shape[-1])
    grad_on = torch.is_grad_enabled()  # off under no_grad / inference_mode (validation)
    need_h, need_w = grad_on and h.requires_grad, grad_on and weight.requires_grad
    if need_h or need_w:
        loss, slot_sums = _ChunkedLinearMultiHotCE.apply(
            flat_h, weight, targets, wv, compute_dtype, chunk_size, step_fn, need_h, need_w
        )
    else:  # forward only: no gradient work, no gradient buffers
        loss, slot_sums, _, _ = chunked_loss(
            flat_h, weight, targets, wv, compute_dtype, chunk_size, step_fn, False, False
        )
    return HeadLoss(loss, slot_sums.detach(), valid.sum(0))


class FusedLossHead(nn.Linear):
    """The model's ``output`` projection; returns a :class:`HeadLoss` when armed.

    Same parameter (shared, so weight tying survives) and FQN as the ``nn.Linear`` it
    replaces: checkpoints, TP plans and export are unchanged.
    """

    def __init__(self, in_features: int, out_features: int, *, chunk_size: int, step_fn: Callable,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.chunk_size = chunk_size
        self.step_fn = step_fn
        self._armed: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, chunk_size: int, step_fn: Callable = chunk_step) -> FusedLossHead:
        if type(linear) is not nn.Linear or linear.bias is not None:
            raise TypeError(f"expected a bias-free nn.Linear, got {type(linear).__name__}")
        head = cls(linear.in_features, linear.out_features, chunk_size=chunk_size, step_fn=step_fn,
                   device="meta")
        head.weight = linear.weight
        return head

    def arm(self, labels: torch.Tensor, slot_weights: torch.Tensor | None) -> None:
        """Labels for the NEXT forward only (consumed by it)."""
        self._armed = (labels, slot_weights)

    def forward(self, h: torch.Tensor):
        armed, self._armed = self._armed, None
        if armed is None:
            return F.linear(h, self.weight)
        labels, slot_weights = armed
        return fused_linear_multi_hot_ce(
            h, self.weight, labels, slot_weights, chunk_size=self.chunk_size, step_fn=self.step_fn
        )


def install_fused_head(model: nn.Module, chunk_size: int, compile_backend: str | None = None) -> FusedLossHead:
    """Swap ``model.output`` (a plain ``nn.Linear``) for a :class:`FusedLossHead` sharing
    its weight. Call before parallelizing (FSDP must wrap the new module)."""
    step_fn = chunk_step
    if compile_backend is not None:
        step_fn = torch.compile(chunk_step, backend=compile_backend)
    head = FusedLossHead.from_linear(model.output, chunk_size, step_fn)
    model.output = head
    logger.info(
        f"tst.fused_loss: output projection + loss in chunks of {chunk_size} positions"
        + (" (chunk step compiled)" if compile_backend else "")
    )
    return head


def arm_fused_head(model: nn.Module, labels: torch.Tensor, slot_weights: torch.Tensor | None = None) -> bool:
    """Arm the model's fused head (if it has one) with the labels of the next forward."""
    head = getattr(model, "output", None)
    if not isinstance(head, FusedLossHead):
        return False
    head.arm(labels, slot_weights)
    return True
