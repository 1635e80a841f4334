"""TS-LoRA (or TS-AdaLoRA) with each TSConfig.recompute_z policy against its dense twin, in one run.

    python benchmarks/recompute.py --threads 1 --repeats 80     # CPU preset: none, auto, all; about 6 minutes

The policies are timed in the same rounds, so their differences (a fraction of a percent) are paired
ratios, not differences between runs. All the logic is in tspeft.bench.compare_recompute.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when tspeft is not installed
    from tspeft.bench import recompute_main

    raise SystemExit(recompute_main(sys.argv[1:]))
