#!/usr/bin/env bash
# GPU check for one CUDA GPU (written for an H200), no network, nothing to download: about 5 minutes;
# the time limits below add up to 9 minutes 30 (the tests get 230 s: Triton compiles each kernel variant once).
#
#   bash benchmarks/gpu_check.sh            # from the repository root; results in $OUT (default ./gpu_out)
#
# The Python is $PYTHON if set, else the first of `python`, `python3` that imports torch; it must have torch
# (CUDA), transformers, peft and triton, and pytest for step 1; the repository is put
# on PYTHONPATH. Nothing else of the package's dependencies is needed (no bundled data, no plots).
#  1. the Triton kernels against the PyTorch reference (tests/test_kernels.py), dropout inside the gate against
#     F.dropout on CUDA (tests/test_dropout.py), the benchmark's tests, and a gated training step that makes
#     no host sync (tests/test_cuda_sync.py: torch.cuda.set_sync_debug_mode("error"), Triton and PyTorch paths);
#  2. the GPU benchmark with the PyTorch path for the TS rows (TSPEFT_KERNELS=0): bench_gpu_pytorch.{json,txt};
#  3. the GPU benchmark with the automatic choice (Triton kernels when they import): bench_gpu.{json,txt}.
# Each step has its own time limit; a failed step is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
status=0

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in python python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" 2>/dev/null; then
      PY=$candidate
      break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "no python that imports torch (tried python, python3): set PYTHON=/path/to/python" >&2
  exit 1
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output in $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0))s"
  [ "$rc" -eq 0 ] || status=1
}

"$PY" - > "$OUT/env.txt" 2>&1 <<'EOF'
import platform, torch, transformers, peft
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "peft", peft.__version__)
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
EOF
cat "$OUT/env.txt"

if ! "$PY" -c "import pytest" 2>/dev/null; then
  echo "== tests: pytest is not importable: the kernel and dropout tests cannot run (pure Python: put it on PYTHONPATH)"
  status=1
fi
step tests 230 "$PY" -m pytest tests/test_kernels.py tests/test_dropout.py tests/test_bench.py tests/test_cuda_sync.py \
  -q -p no:cacheprovider -x
TSPEFT_KERNELS=0 step bench_pytorch 170 "$PY" benchmarks/step.py --device cuda --preset llama8b-4layers \
  --json "$OUT/bench_gpu_pytorch.json" --table "$OUT/bench_gpu_pytorch.txt"
step bench 170 "$PY" benchmarks/step.py --device cuda --preset llama8b-4layers \
  --json "$OUT/bench_gpu.json" --table "$OUT/bench_gpu.txt"

echo "results in $OUT:"
ls -l "$OUT"
exit $status
