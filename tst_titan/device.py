"""The CPU shims: the only place where tst-titan bends torchtitan 0.2.2.

torchtitan 0.2.2 has no CPU mode (pytorch/torchtitan#1661). Two things break on a
machine without CUDA, and both are fixed here, nowhere else:

1. ``torchtitan.tools.utils`` resolves ``device_type = ... or "cuda"`` at import time
   and five modules import ``device_type``/``device_module`` *by name*. We rebind them
   to ``"cpu"`` and to :data:`cpu_device_module`, a module that forwards to
   ``torch.cpu`` and adds the few CUDA-style calls torchtitan makes (device name,
   properties, memory stats: host memory stands in for device memory).
2. FSDP2 reduce-scatters with ``ReduceOp.PREMUL_SUM`` once torchtitan disables its
   gradient division; gloo has no PREMUL_SUM. :func:`force_sum_reduction_on_gloo`
   switches every FSDP module to plain SUM (the divide factor is 1.0 anyway, so the
   result is identical).

On a CUDA machine :func:`apply_cpu_shims` does nothing.

One bend is not about the CPU: :func:`skip_final_sleep`. torchtitan's ``Trainer.train``
ends with rank 0 sleeping 2 s "for other ranks to complete"; ``tst_titan.train.main``
ends with a barrier instead, so on every device that sleep only costs time (2 s per
launch: minutes of the test suite, which launches ~100 jobs).
"""

from __future__ import annotations

import os
import resource
import sys
import time
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

# Modules of torchtitan 0.2.2 that bind device_type / device_module by name.
_DEVICE_BINDING_MODULES = (
    "torchtitan.tools.utils",
    "torchtitan.components.metrics",
    "torchtitan.distributed.utils",
    "torchtitan.distributed.parallel_dims",
    "torchtitan.tools.profiling",
)


@dataclass
class _HostProperties:
    name: str
    total_memory: int


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 34


def _peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _make_cpu_device_module() -> types.ModuleType:
    """A ``torch.cuda``-shaped module for the host, backed by ``torch.cpu``."""
    mod = types.ModuleType("tst_titan_cpu_device")

    def __getattr__(name: str):  # forward everything else to torch.cpu
        return getattr(torch.cpu, name)

    mod.__getattr__ = __getattr__  # type: ignore[attr-defined]
    mod.get_device_name = lambda device=None: "CPU"
    mod.get_device_properties = lambda device=None: _HostProperties(
        "CPU", _host_memory_bytes()
    )
    mod.current_device = lambda: 0
    mod.set_device = lambda device=None: None
    mod.device_count = lambda: 1
    mod.is_available = lambda: True
    mod.synchronize = lambda device=None: None
    mod.empty_cache = lambda: None
    mod.reset_peak_memory_stats = lambda device=None: None

    def memory_stats(device=None) -> dict[str, int]:
        peak = _peak_rss_bytes()
        return {
            "active_bytes.all.peak": peak,
            "reserved_bytes.all.peak": peak,
            "num_alloc_retries": 0,
            "num_ooms": 0,
        }

    mod.memory_stats = memory_stats
    return mod


cpu_device_module = _make_cpu_device_module()


def needs_cpu_shims() -> bool:
    return not torch.cuda.is_available()


def apply_cpu_shims() -> bool:
    """Point torchtitan at the CPU when no CUDA device exists. Returns True if applied.

    Must run before torchtitan builds its trainer (it is called by ``tst_titan.train``
    and by ``import tst_titan``); it is idempotent.
    """
    if not needs_cpu_shims():
        return False
    import importlib

    for name in _DEVICE_BINDING_MODULES:
        module = sys.modules.get(name) or importlib.import_module(name)
        if hasattr(module, "device_type"):
            module.device_type = "cpu"
        if hasattr(module, "device_module"):
            module.device_module = cpu_device_module
    return True


class _TimeWithoutSleep(types.ModuleType):
    """The ``time`` module with ``sleep`` a no-op; everything else forwards to ``time``."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        del seconds


def skip_final_sleep() -> None:
    """Drop the 2 s sleep at the end of torchtitan's ``Trainer.train`` (its only use of
    ``time.sleep``; ``torchtitan.train`` uses ``time`` otherwise for ``perf_counter``).
    Only for entry points that end with a barrier, as ``tst_titan.train.main`` does."""
    import torchtitan.train

    if not isinstance(torchtitan.train.time, _TimeWithoutSleep):
        torchtitan.train.time = _TimeWithoutSleep("time")


def force_sum_reduction_on_gloo(model: nn.Module) -> int:
    """Make FSDP2 reduce with SUM instead of PREMUL_SUM when the backend is gloo.

    Returns the number of FSDP modules changed. The flag is read at reduce time, so
    calling this after ``fully_shard`` is enough.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    backend = str(dist.get_backend())
    if "gloo" not in backend or "nccl" in backend:
        return 0
    from torch.distributed.fsdp import FSDPModule

    n = 0
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
            n += 1
    return n
