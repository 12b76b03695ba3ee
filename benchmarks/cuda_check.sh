#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run (CI has none). Nothing to install where python3 has torch,
# timm, pytest and pyyaml (the scripts find the package in this checkout). Parts, in this order:
#   1. table:    the README's GPU step-cost table (benchmarks/gpu_table.sh, ROUNDS rounds): first, it is
#                what the GPU is most needed for
#   2. train:    train.py end to end on generated images: bf16, fp16 (GradScaler), fp16 + --stop-epoch
#                then --resume; each must finish with finite losses in summary.csv
#   3. tests:    the device-generic tests on CUDA (Table 10 formulas in float64, GradScaler, bf16/fp16 AMP)
#   4. perturb:  host cost of perturb + restore on CUDA (benchmarks/perturb_cost.py)
#   4b. guards:  compiled SAM-ON equals eager on this torch (benchmarks/compile_check.py; torch 2.11's
#                dynamo needs the guard switch of train_step)
#   5. compile:  with COMPILE=1, sgd / sam / sam-on under torch.compile on ResNet-50 b256
#
#   bash benchmarks/cuda_check.sh [OUTDIR [PACKDIR]]   # default ./output/cuda_check; ~6 min on an H100
# OUTDIR gets the logs, JSON rows and a SUMMARY (one line per part). PACKDIR (e.g. a device run's $OUT,
# which returns a few small files) gets SUMMARY and cuda_check.tgz (OUTDIR without checkpoints and images),
# renewed after every part, so what was measured survives a later part failing or running out of time.
# The whole run stops by BUDGET seconds (default 540): each part has a time limit of its own, cut to
# what is left; a part that hangs is stopped and marked, the next ones still run while time remains.
# Environment: PYTHON, ROUNDS (default 1), COMPILE=1, BUDGET, SKIP="tests table ..." (parts to leave out),
# DEVICE=cpu runs train, tests and perturb on the CPU (a check of this script, not of CUDA; slow: CPU float16
# is emulated; table and compile are skipped there; limits and BUDGET are 3x).
set -u -o pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
out=$(mkdir -p "${1:-./output/cuda_check}" && cd "${1:-./output/cuda_check}" && pwd)
pack=""
if [ -n "${2:-}" ]; then pack=$(mkdir -p "$2" && cd "$2" && pwd); fi
py=${PYTHON:-python3}
dev=${DEVICE:-cuda}
skip=" ${SKIP:-} "
[ "$dev" = cuda ] || skip="$skip table compile "
scale=$([ "$dev" = cuda ] && echo 1 || echo 3)   # part limits are sized for a GPU
summary="$out/SUMMARY"
: > "$summary"
deadline=$((SECONDS + ${BUDGET:-$((540 * scale))}))
export PYTHONUNBUFFERED=1 here root out py dev ROUNDS="${ROUNDS:-1}"

pack_results() {   # SUMMARY and a tarball of OUTDIR into PACKDIR (atomic: a kill leaves the previous one)
  [ -n "$pack" ] || return 0
  tar czf "$pack/.cuda_check.tgz" --exclude='*.pth.tar' --exclude='./train/data' -C "$out" . \
      && mv "$pack/.cuda_check.tgz" "$pack/cuda_check.tgz"
  cp "$summary" "$pack/SUMMARY"
}

part() {   # part NAME LIMIT FUNCTION: run unless skipped, within LIMIT s and the budget; log and SUMMARY line
  local name=$1 limit=$(($2 * scale)) fn=$3
  case "$skip" in *" $name "*) echo "$name: skipped" | tee -a "$summary"; return 0;; esac
  local left=$((deadline - SECONDS - 10))
  if [ "$left" -lt 30 ]; then echo "$name: not run (BUDGET spent)" | tee -a "$summary"; pack_results; return 0; fi
  [ "$limit" -le "$left" ] || limit=$left
  local t0=$SECONDS
  echo "=== $name (at most $limit s)"
  timeout -k 5 "$limit" bash -c "$(declare -f "$fn"); $fn" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]} status=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="FAILED (stopped at its $limit s limit)"
  elif [ "$rc" != 0 ]; then status="FAILED (rc $rc)"; fi
  echo "$name: $status in $((SECONDS - t0)) s" | tee -a "$summary"
  pack_results
}

env_info() {
  "$py" - <<'EOF'
import platform, torch, timm
print('python', platform.python_version(), '| torch', torch.__version__, '| timm', timm.__version__)
if torch.cuda.is_available():
    print('card:', torch.cuda.get_device_name(0), '| cuda', torch.version.cuda, '| cudnn', torch.backends.cudnn.version())
EOF
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  return 0
}

run_tests() {
  (cd "$root" && SAM_ON_TIMM_TEST_DEVICE=$dev "$py" -m pytest -q -p no:cacheprovider \
      tests/test_sam_optimizer.py tests/test_train_step.py)
}

run_train() {
  local data="$out/train/data" rc=0
  rm -rf "$out/train" && mkdir -p "$out/train"
  "$py" -c "import sys; sys.path.insert(0, '$root/tests'); from helpers import make_image_folder as m; \
m('$data', n_train=256, n_val=64, classes=2, size=32)" || return 1
  local common=(--data-dir "$data" --model resnet18 --num-classes 2 --img-size 32 -b 32 --sam-m 16
                --opt sam-on-layerl2 --rho 0.05 --lr 0.05 --sched cosine --epochs 2 --warmup-epochs 0
                --cooldown-epochs 0 --workers 2 --log-interval 4 --device "$dev" --amp --channels-last
                --output "$out/train")
  "$py" "$root/train.py" "${common[@]}" --amp-dtype bfloat16 --experiment bf16 || rc=1
  "$py" "$root/train.py" "${common[@]}" --amp-dtype float16 --experiment fp16 || rc=1
  "$py" "$root/train.py" "${common[@]}" --amp-dtype float16 --experiment fp16-resume --stop-epoch 1 || rc=1
  "$py" "$root/train.py" "${common[@]}" --amp-dtype float16 --experiment fp16-resume \
      --resume "$out/train/fp16-resume/last.pth.tar" || rc=1
  "$py" - "$out/train" <<'EOF' || rc=1
import csv, math, os, sys
bad = 0
for name in ('bf16', 'fp16', 'fp16-resume'):
    with open(os.path.join(sys.argv[1], name, 'summary.csv')) as f:
        rows = list(csv.DictReader(f))
    finite = all(math.isfinite(float(v)) for r in rows for k, v in r.items() if k != 'epoch' and v != '')
    ok = len(rows) == 2 and finite
    bad += not ok
    print(f"{name}: {len(rows)} epochs, finite {finite}, last row {rows[-1] if rows else None}")
a, b = (list(csv.DictReader(open(os.path.join(sys.argv[1], n, 'summary.csv'))))[-1] for n in ('fp16', 'fp16-resume'))
print('stopped + resumed vs uninterrupted fp16 run, last epoch:',
      {k: float(b[k]) - float(a[k]) for k in ('train_loss', 'train_eps_norm', 'eval_loss')})
sys.exit(bad)
EOF
  rm -rf "$data" "$out"/train/*/*.pth.tar   # checked: keep the logs and summaries only
  return $rc
}

run_perturb() {
  "$py" "$here/perturb_cost.py" --device "$dev" --model resnet50
}

run_guards() {
  "$py" "$here/compile_check.py"
}

run_table() {
  PYTHON="$py" bash "$here/gpu_table.sh" "$out/step_cost"
}

run_family() {   # the SAM family (docs/design.md, section 8): interval SAM and LookSAM per period of K = 5
  "$py" "$here/step_cost.py" --device cuda --model resnet50 --img-size 224 --batch-size 256 --amp-dtype bfloat16 \
      --channels-last --steps 10 --warmup 3 --opts sgd,sam,sam-on,sam-on/k5,looksam-on/k5,msam-on,gsam-on,esam,esam-on \
      --json "$out/step_cost_family_resnet50_b256.json"
}

run_compile() {
  "$py" "$here/step_cost.py" --device cuda --model resnet50 --img-size 224 --batch-size 256 --amp-dtype bfloat16 \
      --channels-last --compile --steps 20 --warmup 5 --opts sgd,sam,sam-on --json "$out/step_cost_compile_resnet50_b256.json"
}

part env 30 env_info
part table 330 run_table
part train 150 run_train
part tests 150 run_tests
part perturb 90 run_perturb
part guards 60 run_guards
part family 150 run_family
if [ "${COMPILE:-0}" = 1 ]; then part compile 240 run_compile; fi
echo "=== summary ($out/SUMMARY)"
cat "$summary"
! grep -q FAILED "$summary"
