"""The bag embedding against a naive mean, and the model hook's invariants."""

from __future__ import annotations

import dataclasses
import math

import torch

from tst_titan.loss import multi_hot_cross_entropy
from tst_titan.model import BagEmbedding, TSTLlama3, TSTQwen3
from tst_titan.specs import tst_llama3_flavors, tst_qwen3_flavors


def test_bag_embedding_is_fp32_mean_cast_back():
    torch.manual_seed(0)
    emb = BagEmbedding(50, 8).to(torch.bfloat16)
    ids = torch.randint(0, 50, (2, 3, 5))
    got = emb(ids)
    w = emb.weight.detach()
    naive = torch.empty(2, 3, 8, dtype=torch.float32)
    for b in range(2):
        for i in range(3):
            acc = torch.zeros(8, dtype=torch.float32)
            for j in range(5):
                acc += w[ids[b, i, j]].float()
            naive[b, i] = acc / 5
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 8)
    assert torch.equal(got, naive.to(torch.bfloat16))


def test_plain_ids_unchanged_and_s1_identity():
    emb = BagEmbedding(50, 8)
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(emb(ids), torch.nn.functional.embedding(ids, emb.weight))
    assert torch.equal(emb(ids.unsqueeze(-1)), emb(ids))


def test_gradient_spreads_one_over_s_to_each_bag_token():
    emb = BagEmbedding(10, 4)
    ids = torch.tensor([[[1, 2, 2, 3]]])
    emb(ids).sum().backward()
    g = emb.weight.grad.sum(-1)
    assert g[1].item() == 1.0 and g[2].item() == 2.0 and g[3].item() == 1.0 and g[0].item() == 0.0


def _build(cls, args):
    torch.manual_seed(0)
    model = cls(args)
    with torch.no_grad():
        model.init_weights()
    return model


def test_state_dict_keys_match_torchtitan_models():
    from torchtitan.models.llama3 import Transformer
    from torchtitan.models.qwen3 import Qwen3Model

    for cls, base, args in (
        (TSTLlama3, Transformer, tst_llama3_flavors["tiny"]),
        (TSTQwen3, Qwen3Model, tst_qwen3_flavors["tiny"]),
    ):
        with torch.device("meta"):
            assert list(cls(args).state_dict()) == list(base(args).state_dict())
    tied = dataclasses.replace(tst_qwen3_flavors["tiny"], enable_weight_tying=True)
    qwen = _build(TSTQwen3, tied)
    assert qwen.output.weight is qwen.tok_embeddings.weight  # tying preserved


def test_phase1_loss_at_init_is_about_log_vocab():
    args = tst_llama3_flavors["tiny"]
    model = _build(TSTLlama3, args)
    ids = torch.randint(0, args.vocab_size, (2, 16, 4))
    labels = torch.randint(0, args.vocab_size, (2, 16, 4))
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (2, 16, args.vocab_size)
    per_position = float(multi_hot_cross_entropy(logits, labels)) / (2 * 16)
    assert abs(per_position - math.log(args.vocab_size)) < 1.0, per_position


def test_bag_model_sees_the_mean_embedding():
    """A [B, L, s] forward equals the forward of the averaged embeddings."""
    args = tst_llama3_flavors["tiny"]
    model = _build(TSTLlama3, args)
    ids = torch.randint(0, args.vocab_size, (1, 8, 3))
    with torch.no_grad():
        a = model(ids)
        h = model.tok_embeddings.weight[ids].mean(2)
        for layer in model.layers.values():
            h = layer(h, model.freqs_cis, attention_masks=None, positions=None)
        b = model.output(model.norm(h))
    torch.testing.assert_close(a, b)
