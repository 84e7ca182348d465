"""``python -m gpu_check_train`` = ``python -m tst_titan.train`` plus what the GPU check needs.

Used by ``scripts/gpu_check.py`` and, in its shared-GPU mode, by tests/test_parallel.py
(both put ``scripts/`` on PYTHONPATH). Nothing here is part of a training run's
product; on its own it changes nothing:

- ``TST_SHARED_GPU=1``: every rank of a multi-process job uses ``cuda:0`` and the
  process group is gloo. NCCL refuses two ranks on one device, and torchtitan 0.2.2
  puts rank r on ``cuda:<LOCAL_RANK>``. Gloo carries CUDA tensors for the collectives
  FSDP2, DDP, tensor parallel and context parallel use (all-gather, reduce-scatter,
  all-reduce); it is slow, so this is for checking numbers on a one-GPU machine, never
  for timing. FSDP2's PREMUL_SUM is replaced by SUM as on CPU
  (``tst_titan.device.force_sum_reduction_on_gloo`` checks the backend, not the device).
- ``GPU_CHECK_FLAVORS=1``: registers the check's extra flavors, e.g. ``10B-A1B-2L``
  (the 10B-A1B MoE's layer shapes with 2 layers, so one GPU holds it with AdamW).
"""

from __future__ import annotations

import dataclasses
import os

EXTRA_QWEN3_FLAVORS = {"10B-A1B-2L": ("10B-A1B", {"n_layers": 2})}


def _share_one_gpu() -> None:
    import torch.distributed as dist

    os.environ["LOCAL_RANK"] = "0"  # torchtitan: device = cuda:<LOCAL_RANK>
    dist.Backend.default_device_backend_map["cuda"] = "gloo"  # read by torchtitan's init_distributed


def _register_flavors() -> None:
    from torchtitan.protocols.train_spec import get_train_spec

    from tst_titan.specs import register_specs

    register_specs()
    flavors = get_train_spec("tst_qwen3").model_args
    for name, (base, changes) in EXTRA_QWEN3_FLAVORS.items():
        flavors[name] = dataclasses.replace(flavors[base], **changes)


def main() -> None:
    if os.environ.get("TST_SHARED_GPU") == "1":
        _share_one_gpu()
    if os.environ.get("GPU_CHECK_FLAVORS") == "1":
        _register_flavors()
    from tst_titan.train import main as train_main

    train_main()


if __name__ == "__main__":
    main()
