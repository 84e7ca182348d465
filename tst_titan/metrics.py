"""Phase-aware metrics: torchtitan's MetricsProcessor, extended.

torchtitan computes tokens/s, TFLOPs and MFU from the number of *label* tokens,
which reads s times too high in the superposition phase. The TST trainer therefore
feeds ``ntokens_since_last_log`` with model positions (B x L per microbatch), which
keeps torchtitan's ``throughput(tps)``, ``tflops`` and ``mfu(%)`` right in both
phases, and counts data tokens separately. Added TensorBoard scalars:

- ``throughput/data_tokens_per_s``, ``throughput/positions_per_s`` (per device)
- ``tst/phase`` (1 superposition, 2 next-token), ``tst/bag_size`` (s, then 1)
- ``loss_metrics/superposition_mce`` or ``loss_metrics/next_token_ce``: the step's
  loss under the tag of its phase; ``tst/slot_ce/j``: phase-1 CE of slot j
- ``n_tokens_seen``: data tokens (torchtitan's own tag, now counting inputs)
- ``tst/positions_seen``, ``tst/train_flops``: cumulative model positions and training
  FLOPs (equal in both phases per step), the compute axis of ``scripts/compare_runs.py``
- text ``tst/plan``: the phase plan and the data budget (tokens per phase, epochs)
- ``validation_metrics/loss_se``: standard error of the validation loss (from the
  validator, :mod:`tst_titan.validate`)

Rank 0 also appends every logged step to ``<dump_folder>/metrics.jsonl`` with the
loss (and ``validation_loss``, ``validation_loss_se``) at full precision (for exact comparisons between runs, e.g. resume tests).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import torch.distributed as dist

from torchtitan.components.metrics import MetricsProcessor
from torchtitan.tools.logging import logger


StepMetrics = Callable[[int, float], dict[str, Any]]  # (step, global avg loss) -> scalars
ValidationMetrics = Callable[[], dict[str, Any]]  # () -> scalars; a collective, every rank


class TSTMetricsProcessor(MetricsProcessor):
    """torchtitan's processor plus the TST scalars. Its collaborators use four public
    methods: the trainer :meth:`set_step_metrics`, :meth:`count_data_tokens` and
    :meth:`log_text`; the validator :meth:`set_validation_metrics` during a pass."""

    def __init__(self, job_config, parallel_dims, tag: str | None = None):
        super().__init__(job_config, parallel_dims, tag)
        self.data_tokens_since_last_log = 0
        self._step_metrics: StepMetrics | None = None
        self._validation_metrics: ValidationMetrics | None = None
        self._progress_origin: tuple[int, float] | None = None

    def set_step_metrics(self, fn: StepMetrics) -> None:
        """The trainer's phase-aware scalars, added to every logged step."""
        self._step_metrics = fn

    def set_validation_metrics(self, fn: ValidationMetrics | None) -> None:
        """Extra scalars of the validation pass in progress (None after it)."""
        self._validation_metrics = fn

    def count_data_tokens(self, n: int) -> None:
        """Data tokens fed to the model (s per position in phase 1)."""
        self.data_tokens_since_last_log += n

    def log_text(self, tag: str, text: str, step: int) -> None:
        """A text entry in TensorBoard (rank 0's writer), when TensorBoard is on.
        torchtitan 0.2.2's logger container has no text API: this is the one place that
        reaches into it (its ``_loggers`` and their ``writer``)."""
        for sink in getattr(self.logger, "_loggers", []):
            writer = getattr(sink, "writer", None)
            if writer is not None and hasattr(writer, "add_text"):
                writer.add_text(tag, text, step)
                writer.flush()

    def log(self, step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
        extra = dict(extra_metrics or {})
        elapsed = time.perf_counter() - self.time_last_log
        per_device = max(elapsed, 1e-9) * self.parallel_dims.non_data_parallel_size
        extra["throughput/data_tokens_per_s"] = self.data_tokens_since_last_log / per_device
        extra["throughput/positions_per_s"] = self.ntokens_since_last_log / per_device
        if self._step_metrics is not None:
            extra.update(self._step_metrics(step, float(global_avg_loss)))
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra)
        self.data_tokens_since_last_log = 0
        self._append_jsonl(step, global_avg_loss, grad_norm, extra)
        self._log_progress(step, extra)

    def _log_progress(self, step: int, extra: dict[str, Any]) -> None:
        """One console line per log step: where the run is, and when it will end."""
        now, total = time.perf_counter(), self.job_config.training.steps
        if self._progress_origin is None:
            self._progress_origin = (step, now)
            eta = "?"
        else:
            first_step, t0 = self._progress_origin
            per_step = (now - t0) / max(1, step - first_step)
            eta = time.strftime("%H:%M:%S", time.gmtime(per_step * (total - step)))
        phase = extra.get("tst/phase", 2)
        logger.info(
            f"progress: step {step}/{total} ({100 * step / total:.0f}%), phase {phase}, "
            f"data tokens/s {extra['throughput/data_tokens_per_s']:,.0f}, ETA {eta}"
        )

    def log_validation(self, loss, step, extra_metrics=None):
        extra = dict(extra_metrics or {})
        if self._validation_metrics is not None:
            extra.update(self._validation_metrics())
        super().log_validation(loss, step, extra)
        row = {"step": step, "validation_loss": float(loss)}
        if "validation_metrics/loss_se" in extra:
            row["validation_loss_se"] = float(extra["validation_metrics/loss_se"])
        self._write_row(row)

    def _append_jsonl(self, step: int, loss, grad_norm, extra: dict[str, Any]) -> None:
        row = {"step": step, "loss": float(loss), "grad_norm": float(grad_norm)}
        for k, v in extra.items():
            if isinstance(v, (int, float)):
                row[k] = v
            elif hasattr(v, "item"):
                row[k] = v.item()
        self._write_row(row)

    def _write_row(self, row: dict[str, Any]) -> None:
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        folder = self.job_config.job.dump_folder
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


def build_tst_metrics_processor(job_config, parallel_dims, model_args=None, tag=None):
    """TrainSpec ``build_metrics_processor_fn``."""
    return TSTMetricsProcessor(job_config, parallel_dims, tag)
