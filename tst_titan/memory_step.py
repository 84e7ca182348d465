"""One training step as tst_titan's trainer runs it, for the memory plan and its checks.

torchtitan's ``Trainer`` builds the model, optimizers and loss in ``__init__`` and runs
a step in ``train_step`` / ``forward_backward_step``; the memory plan needs that step
alone, on fake tensors (:mod:`tst_titan.memory_plan`) and on real ones
(:mod:`tst_titan.memory_check`), without a dataloader, checkpointer or metrics. Here it
is, rebuilt from the same spec functions (model class, converters, parallelize
function, optimizers, loss) in the trainer's order and nesting, so both see one program.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.tensor import DTensor
from torchtitan.components.loss import cross_entropy_loss
from torchtitan.distributed import ParallelDims
from torchtitan.distributed import utils as dist_utils
from torchtitan.models.llama3.infra import parallelize as llama3_parallelize
from torchtitan.models.qwen3.infra import parallelize as qwen3_parallelize
from torchtitan.protocols.model_converter import build_model_converters
from torchtitan.protocols.train_spec import get_train_spec

from tst_titan.errors import ConfigError
from tst_titan.fused_loss import arm_fused_head
from tst_titan.loss import multi_hot_cross_entropy
from tst_titan.train import parse_config


def load_job_config(config_file: str, overrides: list[str] | tuple[str, ...] = ()):
    """The trainer's own TOML + CLI parsing (``[tst]`` and ``[data]`` included)."""
    return parse_config(["--job.config_file", str(config_file), *overrides])


def phase_shapes(job_config, phase: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input shape, label shape) of one microbatch in ``phase``."""
    t, tst = job_config.training, job_config.tst
    bl = (t.local_batch_size, t.seq_len)
    if phase == 2:
        return bl, bl
    if phase != 1:
        raise ConfigError(f"phase: must be 1 or 2, got {phase}")
    if not tst.enable:
        raise ConfigError("phase 1: the config has tst.enable = false (no superposition phase)")
    bag = (*bl, tst.bag_size)
    return (bag if tst.mode != "output_only" else bl), (bag if tst.mode != "input_only" else bl)


def build_parallel_dims(job_config, world_size: int) -> ParallelDims:
    p = job_config.parallelism
    if p.pipeline_parallel_degree > 1 or p.context_parallel_degree > 1:
        raise ConfigError("parallelism: the memory plan covers FSDP/HSDP, DDP and TP only (no PP, CP)")
    if job_config.tst.fused_loss and p.tensor_parallel_degree > 1:
        raise ConfigError("tst.fused_loss: not with tensor parallel (turn one of them off)")
    return ParallelDims(
        dp_shard=p.data_parallel_shard_degree, dp_replicate=p.data_parallel_replicate_degree,
        cp=p.context_parallel_degree, tp=p.tensor_parallel_degree, pp=p.pipeline_parallel_degree,
        ep=p.expert_parallel_degree, etp=p.expert_tensor_parallel_degree, world_size=world_size,
    )


@contextlib.contextmanager
def cpu_flash_attention_saved() -> Iterator[None]:
    """Op-level selective AC saves the CPU flash-attention output, as it saves CUDA's."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    added = [s for s in (llama3_parallelize._op_sac_save_list, qwen3_parallelize._op_sac_save_list)
             if op not in s]
    for s in added:
        s.add(op)
    try:
        yield
    finally:
        for s in added:
            s.discard(op)


def _ce_as_compiled(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What compiled next-token CE holds (module docstring); DTensor logits (loss
    parallel) keep torchtitan's CE."""
    if isinstance(pred, DTensor):
        return cross_entropy_loss(pred, labels)
    return multi_hot_cross_entropy(pred, labels.unsqueeze(-1), torch.ones(1, device=labels.device))


@dataclasses.dataclass
class StepParts:
    """What one training step needs, built by the trainer's own functions."""

    model: torch.nn.Module
    optimizers: object  # torchtitan's OptimizersContainer
    loss_fn: Callable
    train_context: Callable
    amp: contextlib.AbstractContextManager
    n_params: int
    max_norm: float
    ep_enabled: bool


def build_step_parts(job_config, pdims: ParallelDims, device: str, *,
                     fake: FakeTensorMode | None = None, notes: list[str] | None = None,
                     loss_as_compiled: bool = False) -> StepParts:
    """Model, optimizers and loss as ``Trainer.__init__`` builds them (compile must be off).

    With FSDP or TP the model is made on the meta device and parallelized there (outside
    any fake mode: DeviceMesh computes coordinates with real tensors), then materialised
    on ``device`` (fake under ``fake``). Plain parameters are made on ``device`` directly
    (``to_empty`` cannot swap fake tensors). ``loss_as_compiled``: next-token CE with
    the memory of its compiled form (module docstring).
    """
    notes = [] if notes is None else notes
    spec = get_train_spec(job_config.model.name)
    model_args = spec.model_args[job_config.model.flavor]
    model_args.update_from_config(job_config)
    sharded = pdims.fsdp_enabled or pdims.tp_enabled
    with contextlib.ExitStack() as stack:
        if fake is not None and not sharded:
            stack.enter_context(fake)
        with torch.device("meta" if sharded else device):
            model = spec.model_cls(model_args)
        loops = [m for m in model.modules() if getattr(m, "use_grouped_mm", True) is False]
        for m in loops if fake is not None else ():  # for-loop experts split by data
            m.use_grouped_mm = True
            notes.append("for-loop MoE experts estimated as grouped GEMM")
        n_params = sum(t.numel() for t in model.parameters())
        build_model_converters(job_config, pdims).convert(model)
        model = spec.parallelize_fn(model, pdims, job_config)
    with fake if fake is not None else contextlib.nullcontext():
        if sharded:
            model.to_empty(device=device)
        if fake is None:
            with torch.no_grad():
                model.init_weights(buffer_device=None)
        model.train()
        optimizers = spec.build_optimizers_fn([model], job_config.optimizer, pdims)
        loss_fn = spec.build_loss_fn(job_config, parallel_dims=pdims)
        if loss_as_compiled:
            loss_fn._ce = _ce_as_compiled
    loss_parallel = pdims.tp_enabled and not job_config.parallelism.disable_loss_parallel
    return StepParts(
        model=model, optimizers=optimizers, loss_fn=loss_fn,
        train_context=dist_utils.get_train_context(loss_parallel),
        amp=dist_utils.maybe_enable_amp(pdims, job_config.training.mixed_precision_param, device),
        n_params=n_params, max_norm=job_config.training.max_norm, ep_enabled=pdims.ep_enabled,
    )


def make_batches(job_config, phase: int, n: int, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    vocab = get_train_spec(job_config.model.name).model_args[job_config.model.flavor].vocab_size
    inp, lab = phase_shapes(job_config, phase)
    return [(torch.randint(0, vocab, inp, device=device), torch.randint(0, vocab, lab, device=device))
            for _ in range(n)]


def microbatches_to_track(job_config, pdims: ParallelDims) -> int:
    """2 when the config accumulates gradients (microbatch 2 on are alike), else 1."""
    t = job_config.training
    dp = pdims.get_mesh("batch").size() if pdims.dp_enabled else 1
    gbs = t.global_batch_size if t.global_batch_size > 0 else t.local_batch_size * dp
    return 2 if gbs // (t.local_batch_size * dp) > 1 else 1


def init_optimizer_states(parts: StepParts) -> None:
    """Create the optimizer states as a first step does (zero gradients, one step)."""
    for p in parts.model.parameters():
        p.grad = torch.zeros_like(p)
    parts.optimizers.step()
    parts.optimizers.zero_grad()


def forward_backward(parts: StepParts, batches) -> None:
    """The microbatches of a step, in the order and nesting of torchtitan's
    ``Trainer.forward_backward_step`` (backward under the train context, outside autocast)."""
    model, loss_fn = parts.model, parts.loss_fn
    for inputs, labels in batches:
        weights = loss_fn.weights_on(labels.device) if labels.dim() == 3 else None
        arm_fused_head(model, labels, weights)
        with parts.train_context():
            with parts.amp:
                pred = model(inputs)
                loss = loss_fn(pred, labels) / float(labels.shape[0] * labels.shape[1])
            del pred
            loss.backward()


def optimizer_step(parts: StepParts) -> None:
    """The end of ``Trainer.train_step``: torchtitan's clipping, the step, zero_grad."""
    dist_utils.clip_grad_norm_(list(parts.model.parameters()), parts.max_norm, foreach=True,
                               ep_enabled=parts.ep_enabled)
    parts.optimizers.step()
    parts.optimizers.zero_grad()


def run_step(parts: StepParts, batches) -> None:
    forward_backward(parts, batches)
    optimizer_step(parts)


def prepare_for_plan(job_config, *, fused_loss: bool | None = None,
                     tp: int | None = None) -> tuple[list[str], bool]:
    """Apply the plan's overrides to ``job_config`` in place (compile off: the run is
    eager); returns notes on what was assumed, and whether the loss was compiled (then
    its compiled memory is modelled, see :func:`build_step_parts`)."""
    if tp is not None:
        job_config.parallelism.tensor_parallel_degree = tp
    if fused_loss is not None:
        job_config.tst.fused_loss = fused_loss
    c, notes = job_config.compile, []
    loss_compiled = c.enable and "loss" in c.components
    if c.enable and "model" in c.components:
        notes.append("model compiled in the config, estimated eager (an upper bound)")
    if loss_compiled:
        notes.append("loss compiled in the config: its compiled memory is modelled")
    if job_config.optimizer.implementation != "fused":
        notes.append(f"optimizer.implementation {job_config.optimizer.implementation!r}: "
                     "the step's temporaries are not counted")
    c.enable = False
    return notes, loss_compiled
