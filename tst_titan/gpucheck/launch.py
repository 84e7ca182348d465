"""``python -m tst_titan.gpucheck.launch`` = ``python -m tst_titan.train`` plus what the GPU check needs.

Used by the GPU check's rows and, in its shared-GPU mode, by tests/test_parallel.py.
Nothing here is part of a training run's product; without the switches below it
changes nothing:

- ``TST_SHARED_GPU=1``: every rank of a multi-process job uses ``cuda:0`` and the
  process group is gloo. NCCL refuses two ranks on one device, and torchtitan 0.2.2
  puts rank r on ``cuda:<LOCAL_RANK>``. Gloo carries CUDA tensors for the collectives
  FSDP2, DDP, tensor parallel and context parallel use (all-gather, reduce-scatter,
  all-reduce); it is slow, so this is for checking numbers on a one-GPU machine, never
  for timing. FSDP2's PREMUL_SUM is replaced by SUM as on CPU
  (``tst_titan.device.force_sum_reduction_on_gloo`` checks the backend, not the device).
- ``GPU_CHECK_FLAVORS=1``: registers the check's extra flavors, e.g. ``10B-A1B-2L``
  (the 10B-A1B MoE's layer shapes with 2 layers, so one GPU holds it with AdamW).
- ``GPU_CHECK_PEAK_MEMORY=1`` (CUDA only): every logged step also records
  ``torch.cuda.max_memory_allocated()`` since the previous log step (torchtitan resets
  the peak after each log) as :data:`~tst_titan.gpucheck.runs.PEAK_ALLOCATED_KEY`, in
  ``metrics.jsonl``: the memory_plan row's measurement.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from torchtitan.protocols.train_spec import get_train_spec

from tst_titan.gpucheck.runs import PEAK_ALLOCATED_KEY
from tst_titan.metrics import TSTMetricsProcessor
from tst_titan.specs import register_specs
from tst_titan.train import main as train_main

EXTRA_QWEN3_FLAVORS = {"10B-A1B-2L": ("10B-A1B", {"n_layers": 2})}


def share_one_gpu() -> None:
    os.environ["LOCAL_RANK"] = "0"  # torchtitan: device = cuda:<LOCAL_RANK>
    dist.Backend.default_device_backend_map["cuda"] = "gloo"  # read by torchtitan's init_distributed


def register_extra_flavors() -> None:
    register_specs()
    flavors = get_train_spec("tst_qwen3").model_args
    for name, (base, changes) in EXTRA_QWEN3_FLAVORS.items():
        flavors[name] = dataclasses.replace(flavors[base], **changes)


def record_peak_allocated() -> None:
    """Add the allocator's peak since the last log to every logged step's metrics."""
    log_step = TSTMetricsProcessor.log

    def log(self, step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
        extra = {**(extra_metrics or {}), PEAK_ALLOCATED_KEY: torch.cuda.max_memory_allocated()}
        return log_step(self, step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra)

    TSTMetricsProcessor.log = log


def main() -> None:
    if os.environ.get("TST_SHARED_GPU") == "1":
        share_one_gpu()
    if os.environ.get("GPU_CHECK_FLAVORS") == "1":
        register_extra_flavors()
    if os.environ.get("GPU_CHECK_PEAK_MEMORY") == "1" and torch.cuda.is_available():
        record_peak_allocated()
    train_main()


if __name__ == "__main__":
    main()
