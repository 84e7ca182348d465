"""``python -m fault_entry`` = ``python -m tst_titan.train`` with deterministic pause points.

Used by tests/test_faults.py to SIGKILL a training job at an exact place. The job runs
unchanged except that rank 0 writes ``$FAULT_MARKER`` and sleeps forever:

- ``FAULT_PAUSE_AFTER_SAVE=N``: right after checkpoint step-N is complete;
- ``FAULT_PAUSE_IN_SAVE=N``: while checkpoint step-N is being written: every rank's data
  files are on disk, the ``.metadata`` file (written last by DCP) is not.

The test then kills the whole process tree; nothing of this module is in the product.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def _pause() -> None:
    Path(os.environ["FAULT_MARKER"]).write_text(str(os.getpid()))
    while True:
        time.sleep(60)


def _install() -> None:
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torchtitan.components.checkpoint import CheckpointManager

    after, during = os.environ.get("FAULT_PAUSE_AFTER_SAVE"), os.environ.get("FAULT_PAUSE_IN_SAVE")
    rank0 = os.environ.get("RANK", "0") == "0"
    if after and rank0:
        save = CheckpointManager.save

        def save_then_pause(self, curr_step, *args, **kwargs):
            out = save(self, curr_step, *args, **kwargs)
            if curr_step == int(after):
                _pause()
            return out

        CheckpointManager.save = save_then_pause
    if during and rank0:
        finish = FileSystemWriter.finish

        def pause_before_metadata(self, metadata, results):
            if Path(str(self.path)).name == f"step-{during}":
                _pause()
            return finish(self, metadata, results)

        FileSystemWriter.finish = pause_before_metadata


if __name__ == "__main__":
    from tst_titan import train  # applies the CPU shims first, as `-m tst_titan.train` does

    _install()
    train.main()
