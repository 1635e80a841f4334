"""Reproduce the paper's findings at small scale: a thin script around ``tspeft.reproduce.main``.

    python experiments/reproduce.py --quick          # about an hour on 2 CPU cores, writes docs/results.md
    python experiments/reproduce.py --quick --plan   # the runs and the estimated time, nothing trained
    python experiments/reproduce.py --full --device cuda
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from tspeft.reproduce import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
