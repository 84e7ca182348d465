"""Parallelize functions: torchtitan's own, plus the gloo reduction fix.

TST adds no parameters and keeps ``tok_embeddings`` an ``nn.Embedding``, so
torchtitan's TP plan (RowwiseParallel embedding, loss-parallel output), FSDP2, DDP,
activation checkpointing, float8 conversion and per-block compile apply unchanged.
The one addition is :func:`force_sum_reduction_on_gloo` for CPU runs (see
:mod:`tst_titan.device`).
"""

from __future__ import annotations

import torch.nn as nn
from torchtitan.models.llama3.infra.parallelize import parallelize_llama
from torchtitan.models.qwen3.infra.parallelize import parallelize_qwen3

from tst_titan.device import force_sum_reduction_on_gloo


def parallelize_tst_llama3(model: nn.Module, parallel_dims, job_config) -> nn.Module:
    model = parallelize_llama(model, parallel_dims, job_config)
    force_sum_reduction_on_gloo(model)
    return model


def parallelize_tst_qwen3(model: nn.Module, parallel_dims, job_config) -> nn.Module:
    model = parallelize_qwen3(model, parallel_dims, job_config)
    force_sum_reduction_on_gloo(model)
    return model
