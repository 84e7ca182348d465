"""TSTTrainer: torchtitan's Trainer with the TST phase schedule.

What it adds, each in the hook torchtitan provides for it:

- ``__init__``: config checks before any distributed work; logs the TST plan and the
  data budget (console and TensorBoard text); guards checkpoint loading
  (:mod:`tst_titan.checkpoint`); installs the LR re-warm-up for
  ``at_switch = "reset_optimizer"``; opens the ``data.trace`` file.
- ``batch_generator``: counts data tokens (``n_tokens_seen``) and model positions
  (throughput and MFU) separately.
- ``train_step``: the switch banner and optional optimizer reset; checks that every
  batch has the shape of the step's phase; computes the multi-hot normaliser; writes
  the batch digest when ``data.trace`` is on.
- ``forward_backward_step``: divides by the global valid *weight mass* of the bag
  labels (the number of positions when nothing is ignored), not by the label count.
- ``post_dataloading_process``: context-parallel sharding of [B, L, s] bags along L;
  with ``tst.fused_loss``, arms the model's head with the labels of the forward that
  follows (:mod:`tst_titan.fused_loss`).

The phase itself is decided in one place, :meth:`tst_titan.schedule.TSTPlan.phase`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Iterable, Iterator

import torch
from torchtitan.components.dataloader import DataloaderExhaustedError
from torchtitan.distributed import utils as dist_utils
from torchtitan.protocols.train_spec import get_train_spec
from torchtitan.tools.logging import logger
from torchtitan.train import Trainer

from tst_titan.checkpoint import guard_checkpoint_loading
from tst_titan.checks import check_job_config, check_tokenizer_fits
from tst_titan.errors import ConfigError
from tst_titan.data.budget import plan_budget
from tst_titan.data.loader import TSTPackedDataset, samples_per_step
from tst_titan.fused_loss import arm_fused_head
from tst_titan.loss import TSTLoss, valid_weight_mass
from tst_titan.metrics import TSTMetricsProcessor
from tst_titan.schedule import Phase, plan_from_job_config
from tst_titan.specs import register_specs


class TSTTrainer(Trainer):
    # Built by the TST TrainSpecs (tst_titan.specs); the trainer relies on their public
    # methods (TSTMetricsProcessor.set_step_metrics / count_data_tokens / log_text,
    # TSTLoss.weights / reset_slot_stats / slot_sums) and checks the types once.
    metrics_processor: TSTMetricsProcessor
    loss_fn: TSTLoss

    def __init__(self, job_config):
        register_specs()
        spec = get_train_spec(job_config.model.name)
        check_job_config(job_config, spec)
        if spec.build_tokenizer_fn is not None:
            check_tokenizer_fits(
                spec.build_tokenizer_fn(job_config),
                spec.model_args[job_config.model.flavor],
                job_config.model.flavor,
            )
        self.tst_plan = plan_from_job_config(job_config)
        self._valid_mass: float | None = None
        super().__init__(job_config)
        for name, want in (("metrics_processor", TSTMetricsProcessor), ("loss_fn", TSTLoss)):
            if not isinstance(getattr(self, name), want):
                raise ConfigError(f"model.name: train spec {job_config.model.name!r} does not build a "
                                  f"{want.__name__} ({name}); use a tst_titan train spec")
        guard_checkpoint_loading(self.checkpointer)

        plan = self.tst_plan
        dp = self.parallel_dims.get_mesh("batch").size() if self.parallel_dims.dp_enabled else 1
        per_step = samples_per_step(job_config, dp)
        # Model positions per optimizer step are the same in both phases (L per sequence).
        self._positions_per_step = per_step * dp * job_config.training.seq_len
        plan_text = plan.describe(per_step, dp)
        logger.info(plan_text)
        budget_text = self._check_data_budget(per_step)
        self.metrics_processor.log_text("tst/plan", "\n\n".join(t for t in (plan_text, budget_text) if t), self.step)
        if plan.enabled and plan.at_switch == "reset_optimizer":
            self._install_lr_rewarmup()
        self.metrics_processor.set_step_metrics(self._tst_metrics)
        self._trace_path = None
        if job_config.data.trace:
            folder = os.path.join(job_config.job.dump_folder, "data_trace")
            os.makedirs(folder, exist_ok=True)
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            self._trace_path = os.path.join(folder, f"rank{rank}.jsonl")

    def _check_data_budget(self, per_step: int) -> str | None:
        dataset = self.dataloader.dataset
        if not isinstance(dataset, TSTPackedDataset):
            return None
        budget = plan_budget(dataset.source, self.tokenizer, self.tst_plan, per_step)
        text = budget.describe()
        logger.info(text)
        if budget.epochs is not None and budget.epochs > 1.0:
            msg = (
                f"training.dataset: the run reads about {budget.epochs:.2f} epochs of its data "
                f"(TST phase 1 reads {self.tst_plan.bag_size}x tokens per step); data will repeat"
            )
            if self.job_config.data.strict_budget:
                raise ConfigError(msg + " (data.strict_budget = true)")
            logger.warning(msg)
            text += f"\n\nWARNING: {msg}"
        return text

    # -- the switch ------------------------------------------------------------
    def _install_lr_rewarmup(self) -> None:
        """Re-run the linear warm-up from the switch, on top of the existing schedule.

        Derived from the step alone, so a resumed run gets the same LRs.
        """
        k = self.tst_plan.switch_step
        warmup = max(1, int(self.job_config.lr_scheduler.warmup_steps))
        for sched in self.lr_schedulers.schedulers:
            sched.lr_lambdas = [
                (lambda step, f=f: f(step) * (min(1.0, (step - k + 1) / warmup) if step >= k else 1.0))
                for f in sched.lr_lambdas
            ]

    def _at_switch(self) -> None:
        plan = self.tst_plan
        logger.info(
            "=" * 20 + f" TST switch: step {self.step} starts next-token training "
            f"(phase 2 of 2) after {plan.switch_step} superposition steps with s={plan.bag_size}; "
            f"at_switch={plan.at_switch} " + "=" * 20
        )
        if plan.at_switch == "reset_optimizer":
            for opt in self.optimizers.optimizers:
                opt.state.clear()

    def _check_batch(self, phase: Phase, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        mode = self.tst_plan.mode
        bag_in = phase == Phase.SUPERPOSITION and mode in ("full", "input_only")
        bag_out = phase == Phase.SUPERPOSITION and mode in ("full", "output_only")
        if inputs.dim() != (3 if bag_in else 2) or labels.dim() != (3 if bag_out else 2):
            raise RuntimeError(
                f"TST: step {self.step} is phase {int(phase)} but the dataloader served "
                f"inputs {list(inputs.shape)} and labels {list(labels.shape)}; the "
                "dataloader state does not match the trainer's step"
            )

    # -- trainer hooks -----------------------------------------------------------
    def batch_generator(
        self, data_iterable: Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]]
    ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        data_iterator = iter(data_iterable)
        mp = self.metrics_processor
        while True:
            t0 = time.perf_counter()
            try:
                input_dict, labels = next(data_iterator)
            except StopIteration as ex:
                raise DataloaderExhaustedError() from ex
            inputs = input_dict["input"]
            self.ntokens_seen += inputs.numel()  # data tokens fed to the model
            mp.ntokens_since_last_log += inputs.shape[0] * inputs.shape[1]  # positions
            mp.count_data_tokens(inputs.numel())
            mp.data_loading_times.append(time.perf_counter() - t0)
            yield input_dict, labels

    def train_step(self, data_iterator):
        phase = self.tst_plan.phase(self.step)
        if self.tst_plan.is_switch_step(self.step):
            self._at_switch()
        microbatches = [next(data_iterator) for _ in range(self.gradient_accumulation_steps)]
        for input_dict, labels in microbatches:
            self._check_batch(phase, input_dict["input"], labels)
        if self._trace_path is not None:
            self._trace_batch(microbatches)

        # Multi-hot labels [B, L, s]: normalise by the global valid weight mass.
        self._valid_mass = None
        labels0 = microbatches[0][1]
        if labels0.dim() == 3 and labels0.shape[-1] > 1:
            w = self.loss_fn.weights
            local = sum(valid_weight_mass(lab, w) for _, lab in microbatches).to(self.device)
            if self.parallel_dims.dp_enabled:
                self._valid_mass = dist_utils.dist_sum(local, self.parallel_dims.get_mesh("batch"))
            else:
                self._valid_mass = float(local)
        self.loss_fn.reset_slot_stats()
        super().train_step(iter(microbatches))

    def _trace_batch(self, microbatches) -> None:
        """``data.trace``: one line per step with a digest of everything served."""
        digest = hashlib.sha1()
        for input_dict, labels in microbatches:
            for t in (input_dict["input"], labels):
                digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        shape = list(microbatches[0][0]["input"].shape)
        with open(self._trace_path, "a") as f:
            f.write(json.dumps({"step": self.step, "sha1": digest.hexdigest(), "input_shape": shape}) + "\n")

    def forward_backward_step(self, *, input_dict, labels, global_valid_tokens):
        if self._valid_mass is not None:
            global_valid_tokens = self._valid_mass
        return super().forward_backward_step(
            input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens
        )

    def post_dataloading_process(self, input_dict, labels):
        out = self._post_dataloading_process(input_dict, labels)
        # tst.fused_loss: the model's head computes the loss of these labels in the
        # forward that follows (torchtitan's loss_fn then just returns it).
        labels = out[1]
        arm_fused_head(self.model_parts[0], labels,
                       self.loss_fn.weights_on(labels.device) if labels.dim() == 3 else None)
        return out

    def _post_dataloading_process(self, input_dict, labels):
        inputs = input_dict["input"]
        if not (self.parallel_dims.cp_enabled and inputs.dim() == 3):
            return super().post_dataloading_process(input_dict, labels)
        extra_inputs = {k: v for k, v in input_dict.items() if k != "input"}
        inputs, labels, positions = shard_bags_for_context_parallel(
            inputs,
            labels,
            self.parallel_dims.get_mesh("cp"),
            self.job_config.parallelism.context_parallel_load_balancer,
        )
        return inputs, labels, extra_inputs, {"positions": positions}

    # -- metrics -----------------------------------------------------------------
    def _tst_metrics(self, step: int, global_avg_loss: float) -> dict[str, Any]:
        plan = self.tst_plan
        phase = plan.phase(step)
        positions = step * self._positions_per_step
        out: dict[str, Any] = {
            "tst/phase": int(phase),
            "tst/bag_size": plan.bag_size if phase == Phase.SUPERPOSITION else 1,
            "tst/switch_step": plan.switch_step,  # last phase-1 step (0: no phase 1)
            # Cumulative model positions and training FLOPs (torchtitan's per-token count,
            # forward + backward): the x-axes of equal-compute comparisons.
            "tst/positions_seen": positions,
            "tst/train_flops": float(positions * max(0, self.metrics_processor.num_flops_per_token)),
        }
        if phase == Phase.SUPERPOSITION and plan.mode != "input_only":
            out["loss_metrics/superposition_mce"] = global_avg_loss
            sums, counts = self.loss_fn.slot_sums, self.loss_fn.slot_counts
            if sums is not None:
                stats = torch.cat([sums.float(), counts.float()]).to(self.device)
                if self.parallel_dims.dp_cp_enabled:
                    mesh = self.parallel_dims.get_optional_mesh("loss")
                    torch.distributed.all_reduce(stats, group=mesh.get_group())
                s = sums.numel()
                for j in range(s):
                    out[f"tst/slot_ce/{j + 1}"] = float(stats[j] / stats[s + j].clamp(min=1))
        else:
            out["loss_metrics/next_token_ce"] = global_avg_loss
        return out


def shard_bags_for_context_parallel(inputs, labels, cp_mesh, load_balancer: str | None):
    """Context parallel for bags: "fold, then shard".

    ``inputs`` [B, L, s] are already folded into bags and ``labels`` already hold the
    next bag per position, so sharding along L (dim 1) with torchtitan's load balancer
    keeps every bag and its label on one rank, the last position of each shard
    included. One RoPE position per bag.
    """
    from torchtitan.distributed.context_parallel import cp_shard

    positions = torch.arange(inputs.shape[1], dtype=torch.int32, device=inputs.device)
    positions = positions.expand(inputs.shape[:2])
    (inputs, labels, positions), _ = cp_shard(cp_mesh, (inputs, labels, positions), None, load_balancer)
    return inputs, labels, positions
