#!/usr/bin/env bash
# Mutation testing of ONE module of sam_on_timm with mutmut 3 (in the test extra; settings in setup.cfg
# [mutmut]), against the fast test files that cover it. Not part of CI: a module takes 10 min to hours.
#
#   benchmarks/mutation.sh MODULE [REF]
#
# MODULE: perturbations, sam, train_step, batched, sparse, checkpoint, sharpness, flat.
# REF (optional): take tests/ from that git commit instead of the working tree (a "before" count).
# The run happens in a copy of the tree ($MUTATION_DIR/MODULE, default /tmp/sam-on-timm-mutation), so the
# checkout gets no mutants/ folder and two modules can run side by side. Prints the counts and the survivors
# and writes them to $MUTATION_DIR/MODULE/survivors.txt; `cd` there and `mutmut show NAME` shows a diff.
# Run it niced on a shared machine: MUTATION_CHILDREN (default 1) parallel test processes.
set -euo pipefail
module=${1:?usage: benchmarks/mutation.sh MODULE [REF]}
ref=${2:-}
repo=$(cd "$(dirname "$0")/.." && pwd)
case $module in
  perturbations) tests=(tests/test_sam_optimizer.py tests/test_sparse.py) ;;
  flat)          tests=(tests/test_sam_optimizer.py) ;;
  sam)           tests=(tests/test_sam_optimizer.py tests/test_timm_optim_contract.py tests/test_sam_family.py) ;;
  train_step)    tests=(tests/test_train_step.py tests/test_step_safety.py tests/test_sam_family.py) ;;
  batched)       tests=(tests/test_batched_chunks.py) ;;
  sparse)        tests=(tests/test_sparse.py) ;;
  checkpoint)    tests=(tests/test_checkpoint.py tests/test_robustness.py) ;;
  sharpness)     tests=(tests/test_sharpness.py) ;;
  *) echo "mutation.sh: error: unknown module '$module'; valid: perturbations, flat, sam, train_step, batched," \
          "sparse, checkpoint, sharpness" >&2; exit 2 ;;
esac
# -k: leave out what runs train.py end to end or spawns processes (minutes per mutant), kept by the other files.
# -k matches substrings of test names: each word below names only the tests meant (not 'cli', which is in 'clip')
select=${MUTATION_SELECT:-not two_gloo and not diverging and not test_cli and not full_disk and not killed \
and not bad_numbers and not yaml and not a_split_that and not unwritable and not messages and not train_py and not \
every_float and not non_finite_metric_never}
case $module in   # the float64 Table-10 checks on test_resnet stand for the other three models there
  perturbations|flat|sam) select="$select and not test_vit and not test_efficientnet and not test_convnext" ;;
  train_step) select="$select and not compiled" ;;   # torch.compile in each forked mutant: most of its time
esac
work=${MUTATION_DIR:-/tmp/sam-on-timm-mutation}/$module
rm -rf "$work"
mkdir -p "$work"
(cd "$repo" && git ls-files -z -c -o --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$work"
if [ -n "$ref" ]; then
  for t in "${tests[@]}"; do
    git -C "$repo" show "$ref:$t" > "$work/$t" 2>/dev/null || rm -f "$work/$t"
  done
fi
present=()
for t in "${tests[@]}"; do [ -f "$work/$t" ] && present+=("$t"); done
cd "$work"
python - "$module" "$select" "${present[@]}" <<'PY'
import configparser, sys
module, select, tests = sys.argv[1], sys.argv[2], sys.argv[3:]
cfg = configparser.ConfigParser()
cfg.read('setup.cfg')
cfg['mutmut']['only_mutate'] = f'sam_on_timm/{module}.py'
cfg['mutmut']['pytest_add_cli_args_test_selection'] = '\n' + '\n'.join(tests + ['-k', select])
with open('setup.cfg', 'w') as f:
    cfg.write(f)
PY
echo "mutation.sh: sam_on_timm/$module.py against ${present[*]} (-k $select)${ref:+, tests at $ref}"
mutmut run --max-children "${MUTATION_CHILDREN:-1}" > run.log 2>&1 || { tail -30 run.log; exit 1; }
mutmut results --all true > results.txt 2>&1 || true
grep -E ': survived$' results.txt | sed 's/: survived$//' > survivors.txt || true
for status in killed survived timeout 'no tests' suspicious skipped; do
  n=$(grep -c ": $status\$" results.txt || true)
  echo "$status: $n"
done
echo "survivors (mutmut show NAME in $work):"
cat survivors.txt
