"""Every error tst-titan reports to a user, in one place.

Each is raised with a one-line message that names the setting, file or folder to fix;
the entry points (``tst_titan.train``, the scripts) print it and exit with status 2
instead of a traceback. No module of the package is imported here, so any module may
import these.
"""

from __future__ import annotations


class TSTError(Exception):
    """Base of the user-facing errors below."""


class RunError(TSTError, ValueError):
    """A run folder that cannot be compared or reported (no events, a tag missing)."""
