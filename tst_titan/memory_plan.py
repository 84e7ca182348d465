"""Per-GPU memory plan of a training config, computed without a GPU.

:func:`estimate_memory` builds the config's model as the trainer does (the spec's model
class, converters and parallelize function: FSDP2 with bf16 mixed precision, activation
checkpointing, the fused head) on fake tensors (``FakeTensorMode``: shapes, no storage)
over a fake process group of ``ngpu`` ranks, and runs one steady-state step of one rank
under PyTorch's memory tracker (``FSDPMemTracker``; ``MemTracker`` without FSDP). The
optimizer states exist before the tracked step; with gradient accumulation the step
runs two microbatches, so the second one's peak includes the first one's gradients.
This is torchtitan's ``scripts/estimate/estimation.py`` method, extended to TST's two
phases (phase 1 feeds ``[B, L, s]`` bags and, in mode ``full``, ``[B, L, s]`` labels),
to single-rank and tensor-parallel layouts, and to machines without CUDA.

What the fake run does not see, and what stands in for it:

- ``torch.compile``. The model runs eager (an upper bound for compiled blocks). A compiled
  loss is modelled: next-token CE goes through the multi-hot kernel with s = 1, which holds
  what compiled CE holds (bf16 logits and one bf16 gradient, no fp32 ``[N, V]`` copy; both
  4008 MiB at N = 8192, V = 128,256 in docs/RESULTS.md).
- The GPU's attention kernel: on the fake CPU device SDPA runs the CPU flash kernel, which
  saves what CUDA flash attention saves (output, logsumexp); op-level selective AC saves
  it as it saves its CUDA twin (:func:`tst_titan.memory_step.cpu_flash_attention_saved`).
- MoE routing: the grouped-GEMM padding is sized by the token count alone; the triton
  index fill and int64 ``histc`` (no CPU kernel) get same-shape stand-ins.
- Kernel-internal temporaries that fake kernels skip (ATen's ``logsumexp`` buffer): run as
  ATen runs them (:class:`_AsATenAllocates`).
- Clipping and the fused AdamW step run in place, but the tracker counts in-place ops on
  DTensors at their global size: they run untracked (:func:`_tracked_step`).
- Memory outside tensors (CUDA context, NCCL and cuBLAS workspaces, fragmentation):
  :data:`RESERVE_GIB` is set aside for it in :meth:`MemoryEstimate.fits`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode
from torchtitan.distributed import parallel_dims as titan_parallel_dims
from torchtitan.models.moe import kernels as moe_kernels

from tst_titan import model as tst_model
from tst_titan.memory_step import (
    StepParts,
    build_parallel_dims,
    build_step_parts,
    cpu_flash_attention_saved,
    forward_backward,
    init_optimizer_states,
    load_job_config,
    make_batches,
    microbatches_to_track,
    optimizer_step,
    phase_shapes,
    prepare_for_plan,
)
from tst_titan.specs import register_specs

__all__ = ["GIB", "GPU_GIB", "RESERVE_GIB", "MemoryEstimate", "estimate_memory", "load_job_config"]

GIB = 1 << 30
# One card as torch.cuda.get_device_properties().total_memory reports it:
# 80 GB class (H100 80GB HBM3: 81,559 MiB) and 141 GB class (H200: 143,771 MiB).
GPU_GIB = {"80GB": 81559 / 1024, "141GB": 143771 / 1024}
RESERVE_GIB = 3.0
"""Not in tensors: CUDA context (~0.5 GiB), NCCL and cuBLAS workspaces, fragmentation."""

# Tracker categories (FSDPMemTracker's and MemTracker's names) -> the plan's.
_CATEGORIES = {
    "Sharded Param": "params", "Parameter": "params",
    "Sharded Grad": "grads", "Gradient": "grads",
    "OptState": "optimizer", "Optstate": "optimizer",
    "Unsharded Param": "unsharded_params", "All Gather": "unsharded_params",
    "Unsharded Grad": "grad_buffers", "Reduce Scatter": "grad_buffers",
    "Activation": "activations", "Temp": "temporaries",
}


@dataclasses.dataclass
class MemoryEstimate:
    """One rank's tracked memory for one training step of one phase."""

    flavor: str
    ngpu: int
    tp: int
    phase: int
    fused_loss: bool
    input_shape: tuple[int, ...]
    label_shape: tuple[int, ...]
    microbatches: int  # tracked per step (2 stands for any gradient accumulation)
    ac_mode: str
    n_params: int
    peak_bytes: int
    steady_bytes: int  # live when a step starts: params, optimizer states, buffers, inputs
    breakdown: dict[str, int]  # category -> bytes at the peak
    state_bytes: dict[str, int]  # params / grads / optimizer moments after the backward
    notes: list[str]

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    @property
    def step_bytes(self) -> int:
        """What the step adds to the steady state (activations, gathers, gradients)."""
        return self.peak_bytes - self.steady_bytes

    def fits(self, capacity_gib: float, reserve_gib: float = RESERVE_GIB) -> bool:
        return self.peak_gib + reserve_gib <= capacity_gib

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "peak_gib": round(self.peak_gib, 3)}


class _AsATenAllocates(TorchDispatchMode):
    """Ops whose eager kernels allocate more than their fake (meta) kernels, run as the
    kernels do (pushed above the tracker, which then sees what they allocate).

    - ``logsumexp``: ATen's kernel (CPU and CUDA) computes ``sum((x - amax(x)).exp_())``,
      a temporary the size of its input (an fp32 [chunk, V] in the multi-hot and fused
      losses); a compiled loss fuses it away, so the estimate keeps the eager one.
    - ``histc`` on int64 (the MoE router; CUDA has it, the CPU not): counted on a float copy.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.logsumexp.default:
            x, dims = args[0], args[1]
            keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
            maxes = torch.amax(x, dims, True)
            out = torch.sum((x - maxes).exp_(), dims, keepdim).log_()
            return out.add_(maxes if keepdim else maxes.squeeze(dims))
        if func is torch.ops.aten.histc.default and not args[0].is_floating_point():
            args = (args[0].float(), *args[1:])
        return func(*args, **kwargs)


def _fake_fill_indices(tokens_per_expert_group, start_index_values, write_offsets,
                       experts_per_rank, num_ranks, max_len, *args, **kwargs):
    """Same-shape stand-in for the triton MoE index fill (the values are data)."""
    return torch.full((max_len,), -1, dtype=torch.int32, device=tokens_per_expert_group.device)


def _offsets_outside_fake_mode(*args, **kwargs):
    """DTensor shard offsets are computed with small real tensors (``int(t[0])``)."""
    with unset_fake_temporarily():
        return compute_local_shape_and_global_offset(*args, **kwargs)


@contextlib.contextmanager
def _fake_run_patches() -> Iterator[None]:
    """What the fake CPU run changes in torchtitan and tst_titan, undone on exit."""
    saved = (titan_parallel_dims.device_type, moe_kernels.fill_indices_wrapper,
             tst_model.compute_local_shape_and_global_offset)
    try:
        titan_parallel_dims.device_type = "cpu"  # meshes of fake CPU tensors, on any machine
        moe_kernels.fill_indices_wrapper = _fake_fill_indices
        tst_model.compute_local_shape_and_global_offset = _offsets_outside_fake_mode  # TP bags
        with cpu_flash_attention_saved():
            yield
    finally:
        (titan_parallel_dims.device_type, moe_kernels.fill_indices_wrapper,
         tst_model.compute_local_shape_and_global_offset) = saved


def _state_bytes(model: torch.nn.Module, optimizer) -> dict[str, int]:
    """Local bytes of params, grads and the optimizer's tensor states (AdamW's scalar
    ``step`` counters, 4 bytes per parameter tensor, left out)."""

    def local(t):
        return (t.to_local() if isinstance(t, DTensor) else t).nbytes

    params = list(model.parameters())
    states = [v for p in params for k, v in optimizer.state.get(p, {}).items()
              if torch.is_tensor(v) and k != "step"]
    return {"params": sum(local(p) for p in params),
            "grads": sum(local(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(local(v) for v in states)}


def estimate_memory(job_config, ngpu: int, phase: int, *, fused_loss: bool | None = None,
                    tp: int | None = None) -> MemoryEstimate:
    """One rank's peak memory for a step of ``phase`` (1: superposition, 2: next-token) at
    ``ngpu`` ranks, ``tp`` of them tensor parallel (default: the config's degrees).

    Changes ``job_config`` in place (compile off, fused_loss, tp): pass a fresh one.
    """
    register_specs()
    if dist.is_initialized():
        raise RuntimeError("estimate_memory needs a process without a process group")
    notes, loss_compiled = prepare_for_plan(job_config, fused_loss=fused_loss, tp=tp)
    input_shape, label_shape = phase_shapes(job_config, phase)
    dist.init_process_group("fake", rank=0, world_size=ngpu, store=FakeStore())
    try:
        with _fake_run_patches():
            pdims = build_parallel_dims(job_config, ngpu)
            if pdims.tp_enabled:
                notes.append("tensor parallel: an over-estimate (1.3-1.7x the measured step of a "
                             "tiny model on 2-4 CPU ranks, docs/RESULTS.md)")
            _ = pdims.world_mesh  # outside the fake mode
            fake = FakeTensorMode(allow_non_fake_inputs=True)
            parts = build_step_parts(job_config, pdims, "cpu", fake=fake, notes=notes,
                                     loss_as_compiled=loss_compiled)
            with fake:
                micro = microbatches_to_track(job_config, pdims)
                batches = make_batches(job_config, phase, micro, "cpu")
                init_optimizer_states(parts)  # untracked: a steady-state step finds them
                peak, steady, state = _tracked_step(parts, batches)
    finally:
        dist.destroy_process_group()

    breakdown: dict[str, int] = {}
    for key, val in peak.items():
        name = getattr(key, "value", key)
        if name != "Total":
            cat = _CATEGORIES.get(name, "other")
            breakdown[cat] = breakdown.get(cat, 0) + val
    ac = job_config.activation_checkpoint
    return MemoryEstimate(
        flavor=job_config.model.flavor, ngpu=ngpu, tp=pdims.tp, phase=phase,
        fused_loss=bool(job_config.tst.fused_loss), input_shape=input_shape,
        label_shape=label_shape, microbatches=micro,
        ac_mode=ac.mode + (f":{ac.selective_ac_option}" if ac.mode == "selective" else ""),
        n_params=parts.n_params, peak_bytes=int(peak["Total"]), steady_bytes=int(steady),
        breakdown=breakdown, state_bytes=state, notes=notes,
    )


def _tracked_step(parts: StepParts, batches) -> tuple[dict, int, dict[str, int]]:
    model, optimizer = parts.model, parts.optimizers.optimizers[0]
    inputs = tuple(t for b in batches for t in b)
    if isinstance(model, FSDPModule):
        tracker = FSDPMemTracker(mod=model, optm=optimizer)
        tracker.track_inputs(inputs)
    else:
        tracker = MemTracker()
        tracker.track_external(model, optimizer, *inputs)
    dev = torch.device("cpu")
    with tracker, _AsATenAllocates():
        steady = tracker.get_tracker_snapshot("current")[dev]["Total"]
        forward_backward(parts, batches)
        peak = tracker.get_tracker_snapshot("peak")[dev]
    state = _state_bytes(model, optimizer)
    # Clipping and the fused AdamW step work in place (no step-sized temporaries), but the
    # tracker counts in-place ops on DTensors at their GLOBAL size (the 10B-A1B's clip
    # read 37.6 GiB, its full fp32 gradient): they run untracked. The last gradient's
    # moment (params + grads + states) is in the backward's peak already.
    optimizer_step(parts)
    return peak, steady, state
