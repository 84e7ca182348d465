"""tst.fused_loss: the chunked output projection + multi-hot loss, against a float64
reference written here; the compiled multi-hot loss's memory; the config refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TEST_CONFIG, run_entry
from tst_titan.fused_loss import FusedLossHead, HeadLoss, chunk_step, fused_linear_multi_hot_ce
from tst_titan.loss import TSTLoss, multi_hot_cross_entropy

IGNORE = -100


def reference(h, w, labels, weights):
    """float64 sum_n sum_j w_j (logsumexp(h_n W^T) - (h_n W^T)[t_nj]) over valid labels,
    with its gradients wrt h and W (autograd in float64)."""
    hd = h.detach().double().requires_grad_(True)
    wd = w.detach().double().requires_grad_(True)
    z = hd.reshape(-1, hd.shape[-1]) @ wd.t()
    lab = labels.reshape(z.shape[0], -1)
    total = torch.zeros((), dtype=torch.float64)
    for j in range(lab.shape[1]):
        valid = lab[:, j] != IGNORE
        t = lab[:, j][valid]
        zj = z[valid]
        total = total + weights[j].double() * (torch.logsumexp(zj, -1) - zj[torch.arange(len(t)), t]).sum()
    total.backward()
    return total.detach(), hd.grad, wd.grad


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|"""
    return float((a.double() - ref).abs().max() / ref.abs().max())


def make_case(seed, B=2, L=13, D=24, V=97, s=4, ignore_frac=0.2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, L, D, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(V, D, generator=g) / D**0.5).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (B, L, s), generator=g)
    labels[0, 0] = 3  # one repeated token fills a bag
    labels[0, 1, :2] = 7  # a repeat inside a bag
    labels[torch.rand(B, L, s, generator=g) < ignore_frac] = IGNORE
    labels[1, 2] = IGNORE  # a fully ignored position
    return h, w, labels


POWER = torch.tensor([1, 1 / 2, 1 / 3, 1 / 4]) / sum([1, 1 / 2, 1 / 3, 1 / 4])


@pytest.mark.parametrize("chunk", [5, 26, 1000])  # uneven chunks, exact split, one chunk
@pytest.mark.parametrize("weights", [None, POWER], ids=["uniform", "power_law"])
def test_fused_matches_float64_reference(chunk, weights):
    h, w, labels = make_case(0)
    out = fused_linear_multi_hot_ce(h, w, labels, weights, chunk_size=chunk)
    assert isinstance(out, HeadLoss) and out.loss_sum.dtype == torch.float32
    (out.loss_sum * 0.37).backward()  # a scalar upstream gradient, like 1 / global tokens
    wt = torch.full((4,), 0.25) if weights is None else weights
    ref, dh, dw = reference(h, w, labels, wt)
    assert abs(float(out.loss_sum.detach()) - float(ref)) / abs(float(ref)) < 1e-6
    assert rel(h.grad, 0.37 * dh) < 1e-6 and rel(w.grad, 0.37 * dw) < 1e-6
    # per-slot statistics: the unweighted CE sums and valid counts of each slot
    valid = labels.reshape(-1, 4) != IGNORE
    assert out.slot_counts.tolist() == valid.sum(0).tolist()
    torch.testing.assert_close((out.slot_sums * wt).sum(), out.loss_sum, rtol=1e-6, atol=1e-4)


def test_next_token_labels_are_plain_cross_entropy():
    """s = 1: [B, L] labels give torchtitan's sum cross-entropy, and its gradients."""
    from torchtitan.components.loss import cross_entropy_loss

    h, w, labels = make_case(1, s=1)
    next_tok = labels[..., 0]
    out = fused_linear_multi_hot_ce(h, w, next_tok, chunk_size=7)
    out.loss_sum.backward()
    ref, dh, dw = reference(h, w, labels, torch.ones(1))
    assert abs(float(out.loss_sum.detach()) - float(ref)) / float(ref) < 1e-6
    assert rel(h.grad, dh) < 1e-6 and rel(w.grad, dw) < 1e-6
    stock = cross_entropy_loss(h.detach() @ w.detach().t(), next_tok)
    torch.testing.assert_close(out.loss_sum.detach(), stock, rtol=1e-6, atol=0)


def test_compiled_chunk_step_matches_reference():
    h, w, labels = make_case(2)
    out = fused_linear_multi_hot_ce(h, w, labels, POWER, chunk_size=8, step_fn=torch.compile(chunk_step))
    out.loss_sum.backward()
    ref, dh, dw = reference(h, w, labels, POWER)
    assert abs(float(out.loss_sum.detach()) - float(ref)) / float(ref) < 1e-6
    assert rel(h.grad, dh) < 1e-6 and rel(w.grad, dw) < 1e-6


class _Record(TorchDispatchMode):
    """Records the dtypes of matmuls and the largest tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.mm_dtypes: set[torch.dtype] = set()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.mm_dtypes |= {a.dtype for a in args if isinstance(a, torch.Tensor) and a.dim() == 2}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_one_chunk_of_logits_at_a_time_and_bf16_matmuls():
    h, w, labels = make_case(3, B=4, L=64, D=32, V=1000, dtype=torch.bfloat16, ignore_frac=0.0)
    n, v, chunk = 4 * 64, 1000, 32
    with _Record() as rec:
        out = fused_linear_multi_hot_ce(h, w, labels, chunk_size=chunk)
        out.loss_sum.backward()
    assert rec.mm_dtypes == {torch.bfloat16}
    assert rec.largest == chunk * v, (rec.largest, n * v)  # never [N, V]
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    ref, dh, dw = reference(h, w, labels, torch.full((4,), 0.25))
    # bf16 logits and gradients: the stock path's precision, not float64's
    assert abs(float(out.loss_sum.detach()) - float(ref)) / float(ref) < 1e-3
    assert rel(h.grad, dh) < 2e-2 and rel(w.grad, dw) < 2e-2


def test_autocast_computes_in_bf16_and_returns_fp32_grads():
    h, w, labels = make_case(4)
    with _Record() as rec, torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_linear_multi_hot_ce(h, w, labels, chunk_size=9)
    out.loss_sum.backward()
    assert rec.mm_dtypes == {torch.bfloat16}
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    ref, dh, dw = reference(h, w, labels, torch.full((4,), 0.25))
    assert abs(float(out.loss_sum.detach()) - float(ref)) / float(ref) < 1e-3 and rel(w.grad, dw) < 2e-2


def test_no_grad_forward_is_the_same_loss():
    h, w, labels = make_case(5)
    with torch.no_grad():
        a = fused_linear_multi_hot_ce(h, w, labels, chunk_size=6)
    b = fused_linear_multi_hot_ce(h, w, labels, chunk_size=6)
    assert not a.loss_sum.requires_grad and torch.equal(a.loss_sum, b.loss_sum.detach())


def test_head_is_a_linear_until_armed_and_tst_loss_takes_its_result():
    torch.manual_seed(0)
    lin = nn.Linear(24, 97, bias=False)
    head = FusedLossHead.from_linear(lin, chunk_size=5)
    assert head.weight is lin.weight and list(head.state_dict()) == ["weight"]
    h, _, labels = make_case(6)
    torch.testing.assert_close(head(h), lin(h), rtol=0, atol=0)

    loss_fn = TSTLoss(torch.full((4,), 0.25))
    head.arm(labels, loss_fn.weights_on(labels.device))
    out = head(h)
    assert isinstance(out, HeadLoss)
    assert isinstance(head(h), torch.Tensor)  # the labels were for one forward only
    loss = loss_fn(out, labels)
    logits = lin(h)
    plain = TSTLoss(torch.full((4,), 0.25))
    expect = plain(logits, labels)
    torch.testing.assert_close(loss, expect, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss_fn.slot_sums, plain.slot_sums, rtol=1e-5, atol=1e-4)
    assert torch.equal(loss_fn.slot_counts, plain.slot_counts)
    # next-token labels (phase 2, validation): a loss, no slot statistics
    loss_fn.reset_slot_stats()
    head.arm(labels[..., 0], None)
    assert float(loss_fn(head(h), labels[..., 0])) == pytest.approx(
        float(plain(logits, labels[..., 0])), rel=1e-6)
    assert loss_fn.slot_sums is None


def test_weights_are_copied_to_the_device_once():
    loss_fn = TSTLoss(torch.full((4,), 0.25))
    a = loss_fn.weights_on(torch.device("cpu"))
    assert a is loss_fn.weights_on("cpu") and a.dtype == torch.float32


# -- issue 14 (b): the multi-hot loss's backward under torch.compile ------------------------
def test_compiled_multi_hot_matches_reference_with_a_logits_dtype_gradient():
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(2, 9, 50, generator=g) * 3).to(torch.bfloat16)
    labels = torch.randint(0, 50, (2, 9, 4), generator=g)
    labels[0, 0, :2] = 5
    labels[1, 3] = IGNORE
    x = logits.clone().requires_grad_(True)
    fn = torch.compile(multi_hot_cross_entropy)
    loss = fn(x, labels, POWER)
    (loss * 0.5).backward()
    xr = logits.double().requires_grad_(True)
    z = xr.reshape(-1, 50)
    lab = labels.reshape(-1, 4)
    ref = sum(POWER[j].double() * (torch.logsumexp(z[lab[:, j] != IGNORE], -1)
                                   - z[lab[:, j] != IGNORE].gather(1, lab[:, j][lab[:, j] != IGNORE, None])[:, 0]).sum()
              for j in range(4))
    (ref * 0.5).backward()
    assert x.grad.dtype == torch.bfloat16
    assert abs(float(loss) - float(ref)) / float(ref) < 1e-6  # fp32 logsumexp of bf16 logits
    assert rel(x.grad, xr.grad) < 1e-2  # bf16 output


def test_eager_multi_hot_builds_no_fp32_logits_sized_buffer():
    n, v = 512, 40_000  # 20M logits: more than one eager row chunk (16M elements)
    logits = torch.randn(n, v, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, v, (n, 6))

    class Fp32(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    Fp32.largest = max(Fp32.largest, t.numel())
            return out

    with Fp32():
        multi_hot_cross_entropy(logits, labels).backward()
    assert Fp32.largest <= (1 << 24), Fp32.largest
    assert logits.grad.dtype == torch.bfloat16


# -- config -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override,key",
    [
        (("--tst.fused_loss", "--parallelism.tensor_parallel_degree", "2"), "tst.fused_loss"),
        (("--tst.fused_loss", "--tst.fused_loss_chunk_size", "0"), "tst.fused_loss_chunk_size"),
    ],
)
def test_fused_loss_config_errors_are_one_line(override, key):
    proc = run_entry(TEST_CONFIG, *override)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tst-titan: error: {key}"), last
