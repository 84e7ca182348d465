"""Checkpoint loading guard: a wrong or broken checkpoint is a one-line error.

torchtitan's CheckpointManager resumes from the newest ``step-N`` folder that has DCP's
``.metadata`` file (written last, so a half-written checkpoint is never picked). What it
does not do is explain a checkpoint that cannot be used: DCP raises a multi-rank
traceback for a model of another shape, and an unpickling or I/O error for a damaged
file. :func:`guard_checkpoint_loading` wraps the manager's ``dcp_load`` so that

- before reading any data, every model tensor's shape is compared with the checkpoint's
  metadata (another ``model.flavor``, vocabulary or TP-unaware layout shows up here);
- any failure while reading becomes :class:`CheckpointError` naming the folder.

A checkpoint written under another TST plan (bag size, switch step, sequence length,
data-parallel degree) is refused by the dataloader's state (``CheckpointMismatchError``).
"""

from __future__ import annotations

from typing import Any

import torch

from tst_titan.errors import CheckpointError, CheckpointMismatchError, one_line_reason


def check_model_shapes(state_dict: dict[str, Any], checkpoint_id: str) -> None:
    """Compare the model tensors about to be loaded with the checkpoint's metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        meta = FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {checkpoint_id}: cannot read its .metadata ({one_line_reason(e)}); the checkpoint is "
            "damaged: delete the folder to resume from an earlier one"
        ) from e
    missing, wrong = [], []
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue  # nested states (optimizer, dataloader, ...) are checked by their owners
        saved = meta.get(key)
        if not isinstance(saved, TensorStorageMetadata):
            missing.append(key)
        elif tuple(saved.size) != tuple(value.shape):
            wrong.append(f"{key} is {list(saved.size)} there, {list(value.shape)} here")
    if missing or wrong:
        detail = wrong[0] if wrong else f"{len(missing)} model tensor(s) absent, e.g. {missing[0]}"
        raise CheckpointError(
            f"checkpoint {checkpoint_id} was written for another model ({detail}): "
            "check model.name / model.flavor, or point checkpoint.folder elsewhere"
        )


def guard_checkpoint_loading(checkpointer) -> None:
    """Wrap ``checkpointer.dcp_load`` (torchtitan 0.2.2's single load path) in the checks."""
    from torch.distributed.checkpoint.api import CheckpointException

    load = checkpointer.dcp_load

    def checked_dcp_load(state_dict, checkpoint_id, from_hf, from_quantized):
        if not from_hf:
            check_model_shapes(state_dict, checkpoint_id)
        try:
            return load(state_dict, checkpoint_id=checkpoint_id, from_hf=from_hf, from_quantized=from_quantized)
        except (CheckpointMismatchError, CheckpointError):
            raise
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            # DCP wraps errors raised in our Stateful objects; keep their own message.
            cause = e
            while cause is not None:
                if isinstance(cause, CheckpointMismatchError):
                    raise cause
                cause = cause.__cause__ or cause.__context__
            raise CheckpointError(
                f"checkpoint {checkpoint_id} cannot be loaded ({one_line_reason(e)}); it is damaged or "
                "incomplete: delete the folder to resume from an earlier one"
            ) from e

    checkpointer.dcp_load = checked_dcp_load
