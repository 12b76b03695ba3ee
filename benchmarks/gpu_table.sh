#!/usr/bin/env bash
# The README's GPU step-cost table (one GPU, bf16, channels_last, eager):
# ResNet-50 and ViT-S/16 at batch 256, ResNet-50 at batch 64, the five optimizers, then SGD vs SAM-ON
# with --sam-ascent-frac 0.25. About 3 minutes on one H100.
#   bash benchmarks/gpu_table.sh [OUTDIR]          # JSON rows and the tables land in OUTDIR (./output/step_cost)
# Extra arguments for every run can be given in STEP_COST_ARGS (e.g. STEP_COST_ARGS=--compile).
set -u -o pipefail
out=${1:-./output/step_cost}
mkdir -p "$out"
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
rc=0
for cfg in "resnet50 256" "vit_small_patch16_224 256" "resnet50 64"; do
  set -- $cfg
  common=(--device cuda --model "$1" --img-size 224 --batch-size "$2" --amp-dtype bfloat16 --channels-last
          --steps 30 --warmup 5 --rounds ${ROUNDS:-2} ${STEP_COST_ARGS:-})
  "$py" "$here/step_cost.py" "${common[@]}" --opts sgd,sam,sam-on,sam-on-layerl2,sam-layerl2 \
      --json "$out/step_cost_$1_b$2.json" | tee "$out/step_cost_$1_b$2.md" || rc=1
  "$py" "$here/step_cost.py" "${common[@]}" --opts sgd,sam-on --sam-ascent-frac 0.25 \
      --json "$out/step_cost_$1_b$2_frac.json" | tee "$out/step_cost_$1_b$2_frac.md" || rc=1
done
exit $rc
