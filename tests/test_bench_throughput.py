"""tst_titan.bench.throughput (scripts/bench_throughput.py) times the model training
would run, RoPE included.

The benchmark used to cast the whole model with ``.to(torch.bfloat16)``, which also casts
llama3's complex RoPE buffer ``freqs_cis`` to a real dtype and drops its imaginary
part (with a warning only): on CUDA it timed a broken model. It now keeps fp32
weights and runs bf16 under torchtitan's own single-device autocast.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from tst_titan.bench.throughput import build_model
from tst_titan.model import TSTLlama3
from tst_titan.specs import tst_llama3_flavors


def _fp32_reference(flavor: str, seq_len: int):
    torch.manual_seed(0)
    model = TSTLlama3(dataclasses.replace(tst_llama3_flavors[flavor], max_seq_len=seq_len))
    with torch.no_grad():
        model.init_weights()
    return model


def test_bf16_setup_keeps_complex_rope_and_fp32_weights():
    ref = _fp32_reference("tiny", 32)
    assert ref.freqs_cis.is_complex()
    model, autocast = build_model("tiny", 32, torch.device("cpu"), "bf16")

    assert model.freqs_cis.dtype == ref.freqs_cis.dtype == torch.complex64
    assert torch.equal(model.freqs_cis, ref.freqs_cis)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name  # same initialisation as the fp32 model
    x = torch.randint(0, 2048, (2, 32, 4))
    with autocast():
        out = model(x)
    assert out.dtype == torch.bfloat16  # compute runs in bf16, as torchtitan's AMP path
    with torch.no_grad():
        want = ref(x)
    assert (out.float() - want).abs().max() < 0.1 * want.abs().max()


def test_the_old_whole_model_cast_broke_rope():
    """What the fix avoids: casting the module casts the complex buffer too."""
    model = _fp32_reference("tiny", 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.to(torch.bfloat16)
    assert not model.freqs_cis.is_complex()
