"""Every error tst-titan reports to a user, in one place.

Each is raised with a one-line message that names the setting, file or folder to fix;
the entry points (``tst_titan.train``, the scripts) print it and exit with status 2
instead of a traceback (:data:`USER_ERRORS`). This module imports nothing of the
package, so every module may import it.
"""

from __future__ import annotations


class TSTError(Exception):
    """Base of the user-facing errors below."""


class ConfigError(TSTError, ValueError):
    """An invalid configuration value; the message starts with the offending key."""


class DataError(TSTError, ValueError):
    """Missing, unreadable or unsuitable data; the message names the config key or option."""


class CheckpointError(TSTError, ValueError):
    """A checkpoint that does not belong to this model or cannot be read."""


class CheckpointMismatchError(TSTError, RuntimeError):
    """A checkpoint written under a different TST plan (or data layout) than the current config."""


class ExportError(TSTError, ValueError):
    """The checkpoint or model cannot be exported (phase-1 checkpoint, unsupported shape)."""


class RunError(TSTError, ValueError):
    """A run folder that cannot be compared or reported (no events, a tag missing)."""


class EvalError(TSTError, ValueError):
    """A downstream evaluation that cannot run: lm-eval missing, a task unknown, or its
    data on the Hugging Face hub and the hub out of reach."""


def one_line_reason(e: BaseException) -> str:
    """The last meaningful line of an exception's message, for one-line user errors
    (library errors and DCP's per-rank CheckpointException span many lines)."""
    lines = [
        line.strip() for line in str(e).splitlines()
        if line.strip() and not line.startswith(("Traceback", "  File"))
    ]
    return lines[-1] if lines else type(e).__name__


# What an entry point turns into one line on stderr and exit status 2.
USER_ERRORS: tuple[type[Exception], ...] = (TSTError,)
