"""Where a result comes from: the package version, the git commit of the working tree and library versions."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any


def git_state() -> tuple[str, bool] | None:
    """Return (short commit, whether tracked files have uncommitted changes) of this checkout, or None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha, bool(dirty)) if sha else None


def describe_commit(state: tuple[str, bool] | None) -> str:
    """Return "<sha>" or "<sha>, with uncommitted changes" (or "" for None)."""
    if state is None:
        return ""
    sha, dirty = state
    return f"{sha}, with uncommitted changes" if dirty else sha


def provenance() -> dict[str, Any]:
    """Return {tspeft, commit, dirty, torch, transformers, peft}: what a run records next to its scores."""
    import peft
    import torch
    import transformers

    import tspeft

    state = git_state()
    return {"tspeft": tspeft.__version__, "commit": state[0] if state else None,
            "dirty": state[1] if state else None, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}
