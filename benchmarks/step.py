"""One training step, forward + backward: dense PEFT vs token selection, time and peak memory.

    python benchmarks/step.py                                   # CPU preset, about 2 minutes
    python benchmarks/step.py --threads 1 --json step.json      # steadier on shared cores
    python benchmarks/step.py --device cuda --preset llama8b-4layers --json bench_gpu.json

All the logic is in tspeft.bench (``tspeft bench`` runs the same); this script only calls it.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when tspeft is not installed
    from tspeft.bench import main

    raise SystemExit(main(sys.argv[1:]))
