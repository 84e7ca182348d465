"""The model hook: bag-superposed input embeddings, with no new parameters.

:class:`BagEmbedding` is an ``nn.Embedding`` (same parameter, same FQN
``tok_embeddings.weight``, same TP plan, same HF state-dict mapping) whose forward
accepts token ids of shape ``[B, L, s]`` and returns the fp32 mean of the s
embeddings of each bag, cast back to the model dtype: one position per bag, so RoPE
positions are 0..L-1. Plain ``[B, L]`` ids go through ``nn.Embedding`` unchanged.

:class:`TSTLlama3` and :class:`TSTQwen3` (dense and MoE) are torchtitan's own model
classes with a BagEmbedding swapped in right after construction (re-tying the output
head when the model ties weights).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchtitan.models.llama3 import Transformer
from torchtitan.models.qwen3 import Qwen3Model


class BagEmbedding(nn.Embedding):
    """``nn.Embedding`` that averages the embeddings of a bag when given [B, L, s] ids."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 3:
            return super().forward(ids)
        emb = F.embedding(ids, self.weight)  # [B, L, s, D] in the weight's dtype
        s = ids.shape[-1]
        # Sum in fp32 without materialising an fp32 copy, divide, cast back.
        return (torch.sum(emb, dim=2, dtype=torch.float32) / s).to(emb.dtype)


def _install_bag_embedding(model: nn.Module) -> None:
    old = model.tok_embeddings
    if old is None:  # a pipeline stage without embeddings
        return
    new = BagEmbedding(
        old.num_embeddings,
        old.embedding_dim,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    model.tok_embeddings = new
    if getattr(model, "enable_weight_tying", False):
        model.output.weight = new.weight


class TSTLlama3(Transformer):
    """torchtitan's llama3 ``Transformer`` with bag-superposed inputs."""

    def __init__(self, model_args):
        super().__init__(model_args)
        _install_bag_embedding(self)


class TSTQwen3(Qwen3Model):
    """torchtitan's ``Qwen3Model`` (dense or MoE) with bag-superposed inputs."""

    def __init__(self, model_args):
        super().__init__(model_args)
        _install_bag_embedding(self)
