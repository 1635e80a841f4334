"""What the gate itself costs: TS-LoRA (or TS-AdaLoRA, TS-Adapter) at tau = 0 with its gate and with the gate
bypassed, against the dense twin, in one run.

    python benchmarks/gate_cost.py --threads 1 --repeats 60     # CPU preset, LoRA; about 5 minutes

"Gate bypassed" is the same gated model with the gate's own work (norms, mask, statistics, mu, g_k) skipped:
the fused update alone. The three rows are timed in the same rounds, so `x bypassed` of the TS row is the
gate's cost as a paired ratio, and `x dense` of the bypassed row is the fused update against peft's.
All the logic is in tspeft.bench.compare_gate_cost.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when tspeft is not installed
    from tspeft.bench import gate_cost_main

    raise SystemExit(gate_cost_main(sys.argv[1:]))
