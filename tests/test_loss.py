"""Multi-hot cross-entropy against a naive float64 reference written here."""

from __future__ import annotations

import math

import pytest
import torch

from tst_titan.loss import TSTLoss, multi_hot_cross_entropy, valid_weight_mass
from tst_titan.schedule import TSTPlan

IGNORE = -100


def reference_mce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum over positions and slots of w_j * (logsumexp(z) - z[t]), loops in float64."""
    z = logits.double().reshape(-1, logits.shape[-1])
    t = labels.reshape(-1, labels.shape[-1])
    total = torch.zeros((), dtype=torch.float64)
    for n in range(z.shape[0]):
        lse = torch.log(torch.exp(z[n] - z[n].max()).sum()) + z[n].max()
        for j in range(t.shape[1]):
            if int(t[n, j]) == IGNORE:
                continue
            total = total + weights[j].double() * (lse - z[n, int(t[n, j])])
    return total


def make_case(seed: int, B=2, L=5, V=11, s=4, ignore_frac=0.2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, L, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (B, L, s), generator=g)
    labels[0, 0] = 3  # a bag made of one repeated token
    labels[0, 1, :2] = 7  # a repeat inside a bag
    mask = torch.rand(B, L, s, generator=g) < ignore_frac
    labels[mask] = IGNORE
    return logits, labels


@pytest.mark.parametrize("weighting", ["uniform", "power_law"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_value_and_grad(weighting, seed):
    s = 4
    w = TSTPlan(bag_size=s, switch_step=1, total_steps=2, seq_len=5, bag_weighting=weighting).slot_weights()
    logits, labels = make_case(seed, s=s)
    x = logits.clone().requires_grad_(True)
    got = multi_hot_cross_entropy(x, labels, None if weighting == "uniform" else w)
    got.backward()

    xr = logits.double().clone().requires_grad_(True)
    ref = reference_mce(xr, labels, w.double())
    ref.backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)


def test_power_law_weights():
    w = TSTPlan(bag_size=4, switch_step=1, total_steps=2, seq_len=1, bag_weighting="power_law").slot_weights()
    expect = torch.tensor([1, 1 / 2, 1 / 3, 1 / 4]) / sum([1, 1 / 2, 1 / 3, 1 / 4])
    torch.testing.assert_close(w, expect)
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-6)


def test_bf16_logits_grad_dtype_and_value():
    logits, labels = make_case(5, dtype=torch.bfloat16, ignore_frac=0.0)
    x = logits.clone().requires_grad_(True)
    got = multi_hot_cross_entropy(x, labels)
    got.backward()
    ref = reference_mce(logits.float(), labels, torch.full((4,), 0.25))
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_all_ignored_is_zero_and_mass_zero():
    logits, labels = make_case(3)
    labels[:] = IGNORE
    x = logits.clone().requires_grad_(True)
    loss = multi_hot_cross_entropy(x, labels)
    loss.backward()
    assert float(loss) == 0.0 and float(x.grad.abs().sum()) == 0.0
    assert float(valid_weight_mass(labels, None)) == 0.0


def test_mass_is_positions_when_nothing_ignored():
    _, labels = make_case(4, ignore_frac=0.0)
    w = torch.tensor([0.4, 0.3, 0.2, 0.1])
    assert float(valid_weight_mass(labels, w)) == pytest.approx(labels.shape[0] * labels.shape[1])


def test_s1_is_torchtitan_cross_entropy_bitwise():
    from torchtitan.components.loss import cross_entropy_loss

    logits, labels = make_case(6, s=1, ignore_frac=0.1)
    loss_fn = TSTLoss(torch.ones(1))
    a = loss_fn(logits, labels)
    b = cross_entropy_loss(logits, labels.squeeze(-1))
    assert torch.equal(a, b)


def test_tst_loss_dispatches_on_label_rank_and_records_slots():
    from torchtitan.components.loss import cross_entropy_loss

    logits, labels = make_case(7, ignore_frac=0.0)
    loss_fn = TSTLoss(torch.full((4,), 0.25))
    next_tok = labels[..., 0]
    assert torch.equal(loss_fn(logits, next_tok), cross_entropy_loss(logits, next_tok))
    loss_fn.reset_slot_stats()
    total = loss_fn(logits, labels)
    # per-slot CE sums add up (with the weights) to the loss
    torch.testing.assert_close((loss_fn.slot_sums * 0.25).sum(), total)
    assert loss_fn.slot_counts.tolist() == [labels.shape[0] * labels.shape[1]] * 4


def _count_logit_sized_allocations(fn, numel: int) -> int:
    """Number of new tensors with ``numel`` elements that ops create while ``fn`` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inplace = func._schema.name.endswith("_") or any(a.is_out for a in func._schema.arguments)
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.numel() == numel and not inplace:
                    if func not in (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default,
                                    torch.ops.aten.detach.default, torch.ops.aten.alias.default,
                                    torch.ops.aten.reshape.default, torch.ops.aten.t.default):
                        Count.n += 1
            return out

    with Count():
        fn()
    return Count.n


@pytest.mark.parametrize("s", [2, 8, 16])
def test_memory_one_logits_sized_buffer_whatever_s(s):
    """Forward and backward create the same number of [N, V] tensors for every s:
    the logsumexp is shared and the gradient is built in one buffer, not s."""
    N, V = 32, 257
    logits = torch.randn(N, V, requires_grad=True)
    labels = torch.randint(0, V, (N, s))

    def step():
        multi_hot_cross_entropy(logits, labels).backward()

    n = _count_logit_sized_allocations(step, N * V)
    assert n <= 4, f"{n} logits-sized tensors for s={s}"
