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
from torch.distributed.tensor import DTensor, Partial
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torchtitan.models.llama3 import Transformer
from torchtitan.models.qwen3 import Qwen3Model


class BagEmbedding(nn.Embedding):
    """``nn.Embedding`` that averages the embeddings of a bag when given [B, L, s] ids."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 3:
            return super().forward(ids)
        if isinstance(self.weight, DTensor):
            return self._vocab_sharded_bag_mean(ids)
        return _bag_mean(F.embedding(ids, self.weight))

    def _vocab_sharded_bag_mean(self, ids: torch.Tensor) -> DTensor:
        """Tensor parallel: the table is sharded by rows (vocab) over the TP mesh.

        Each rank embeds the bag tokens it owns (zeros for the others), averages over
        the bag locally, and returns a Partial(sum) DTensor; TorchTitan's
        RowwiseParallel output hook then reduce-scatters it to the sequence-parallel
        layout, exactly as for plain tokens. (DTensor's own embedding output is a
        MaskPartial whose mask cannot follow a reduction over the bag dimension.)
        """
        w = self.weight
        if len(w.placements) != 1 or not w.placements[0].is_shard(0):
            raise NotImplementedError(
                f"BagEmbedding: unsupported weight placements {w.placements} for bag inputs"
            )
        local_w = w.to_local()
        _, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
        start = offset[0]
        local_ids = ids.to_local() if isinstance(ids, DTensor) else ids
        owned = (local_ids >= start) & (local_ids < start + local_w.shape[0])
        emb = F.embedding(torch.where(owned, local_ids - start, 0), local_w)
        emb = emb * owned.unsqueeze(-1).to(emb.dtype)
        return DTensor.from_local(_bag_mean(emb), w.device_mesh, [Partial()], run_check=False)


def _bag_mean(emb: torch.Tensor) -> torch.Tensor:
    """[B, L, s, D] -> [B, L, D]: sum in fp32 (no fp32 copy of the input), divide, cast back."""
    return (torch.sum(emb, dim=2, dtype=torch.float32) / emb.shape[2]).to(emb.dtype)


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
