"""Parallelize functions: torchtitan's own, plus two gradient-reduction fixes.

TST adds no parameters and keeps ``tok_embeddings`` an ``nn.Embedding``, so
torchtitan's TP plan (RowwiseParallel embedding, loss-parallel output), FSDP2, DDP,
activation checkpointing, float8 conversion and per-block compile apply unchanged.
Two additions, both about how data-parallel gradients are reduced:

- :func:`force_sum_reduction_on_gloo` for CPU runs (see :mod:`tst_titan.device`).
- :func:`sum_gradients_under_ddp`: torchtitan 0.2.2 normalises the loss by the
  *global* token count (sum over data-parallel ranks), so the ranks' gradients must be
  SUMMED; its FSDP does so (``set_gradient_divide_factor(1.0)``) but its DDP
  (``replicate``) keeps DDP's default *average*, which makes DDP gradients 1/dp of
  FSDP's. AdamW hides the scale but gradient clipping does not: DDP and FSDP runs of
  the same job then clip at different steps (measured: grad norm exactly half, losses
  2e-3 apart after three clipped steps). The hook makes DDP sum, like FSDP.
"""

from __future__ import annotations

import torch.distributed as dist
import torch.nn as nn
from torchtitan.models.llama3.infra.parallelize import parallelize_llama
from torchtitan.models.qwen3.infra.parallelize import parallelize_qwen3

from tst_titan.device import force_sum_reduction_on_gloo
from tst_titan.errors import ConfigError
from tst_titan.fused_loss import install_fused_head


def _allreduce_sum_hook(process_group, bucket):  # -> Future[Tensor] (DDP checks the annotation)
    """DDP comm hook: all-reduce a gradient bucket with SUM and no division."""
    fut = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def sum_gradients_under_ddp(model: nn.Module, parallel_dims) -> bool:
    """Register the SUM hook on a model that torchtitan wrapped with ``replicate`` (DDP)."""
    from torch.distributed._composable.replicate import DDP

    if not isinstance(model, DDP):
        return False
    group = parallel_dims.get_mesh("dp_replicate").get_group()
    model.register_comm_hook(group, _allreduce_sum_hook)  # applied at DDP's lazy init
    return True


def _finish(model: nn.Module, parallel_dims) -> nn.Module:
    force_sum_reduction_on_gloo(model)
    sum_gradients_under_ddp(model, parallel_dims)
    return model


def _maybe_fused_head(model: nn.Module, job_config) -> None:
    """``[tst] fused_loss``: swap ``output`` for the loss-computing head before FSDP wraps
    it (same weight and FQN), so FSDP's own hooks unshard it for the chunk loop."""
    tst = getattr(job_config, "tst", None)
    if tst is None or not tst.fused_loss or getattr(model, "output", None) is None:
        return
    if type(model.output) is not nn.Linear:
        raise ConfigError(
            f"tst.fused_loss: the output projection is a {type(model.output).__name__}, not a "
            "plain nn.Linear (exclude 'output' from model converters, or turn fused_loss off)"
        )
    c = job_config.compile
    backend = c.backend if c.enable and "loss" in c.components else None
    install_fused_head(model, tst.fused_loss_chunk_size, backend)


def parallelize_tst_llama3(model: nn.Module, parallel_dims, job_config) -> nn.Module:
    _maybe_fused_head(model, job_config)
    return _finish(parallelize_llama(model, parallel_dims, job_config), parallel_dims)


def parallelize_tst_qwen3(model: nn.Module, parallel_dims, job_config) -> nn.Module:
    _maybe_fused_head(model, job_config)
    return _finish(parallelize_qwen3(model, parallel_dims, job_config), parallel_dims)
