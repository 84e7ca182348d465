"""Next-token validation that reads our held-out data in both phases.

torchtitan's ``Validator`` builds its dataloader from its own dataset registry; this
subclass only swaps in :func:`build_validation_dataloader` (embedded / local / hf
sources). The model is always evaluated on ordinary token input with the next-token
loss, so validation losses are comparable across phases, bag sizes and runs.
"""

from __future__ import annotations

from torchtitan.components.validate import Validator
from torchtitan.tools.logging import logger

from tst_titan.data.loader import build_validation_dataloader
from tst_titan.fused_loss import arm_fused_head


class TSTValidator(Validator):
    def __init__(
        self,
        job_config,
        dp_world_size: int,
        dp_rank: int,
        tokenizer,
        parallel_dims,
        loss_fn,
        validation_context,
        maybe_enable_amp,
        metrics_processor,
        pp_schedule=None,
        pp_has_first_stage=None,
        pp_has_last_stage=None,
    ):
        # Same attributes as Validator.__init__, minus its own dataloader.
        self.job_config = job_config
        self.tokenizer = tokenizer
        self.parallel_dims = parallel_dims
        self.loss_fn = loss_fn
        self.validation_dataloader = build_validation_dataloader(
            dp_world_size, dp_rank, tokenizer, job_config
        )
        self.validation_context = validation_context
        self.maybe_enable_amp = maybe_enable_amp
        self.metrics_processor = metrics_processor
        self.pp_schedule = pp_schedule
        self.pp_has_first_stage = pp_has_first_stage
        self.pp_has_last_stage = pp_has_last_stage
        if job_config.validation.steps == -1:
            logger.warning(
                "validation.steps = -1 reads the whole validation split; ranks with "
                "unequal shares would hang, so prefer a fixed number of steps."
            )

    def post_dataloading_process(self, input_dict, labels, model_parts):
        out = super().post_dataloading_process(input_dict, labels, model_parts)
        arm_fused_head(model_parts[0], out[1])  # tst.fused_loss: the head returns the loss
        return out


def build_tst_validator(**kwargs) -> TSTValidator:
    """TrainSpec ``build_validator_fn``."""
    return TSTValidator(**kwargs)
