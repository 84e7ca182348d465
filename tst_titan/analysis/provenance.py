"""Where a figure comes from: the commit and the machine (for RESULTS and raw results)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def commit_of(repo: Path) -> str:
    """Short commit of ``repo``'s HEAD, marked when tracked files have changes; 'unknown'
    outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return (sha or "unknown") + (" (with uncommitted changes)" if sha and dirty else "")


def machine_line() -> str:
    """'<n> CPU cores (<model>), <OS>, Python <v>, torch <v>'."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPU cores ({model}), {platform.system()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}")
