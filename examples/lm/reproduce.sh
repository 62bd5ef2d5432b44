#!/usr/bin/env bash
# The LM table of examples/lm/README.md: fp, bwn-ste, LAQ, BLAQ (every step) and
# BLAQ-m (m = 5) at 2 and 4 bits (groups of 64; embeddings and head at 8 bits),
# seeds SEEDS. Each run writes runs/lm/<method>_<bits>bit_s<seed>/; finished runs
# are skipped, interrupted ones resume from their checkpoint. Two copies at once
# (one per core) take turns: each run is claimed with an atomic mkdir.
#   taskset -c 0 bash examples/lm/reproduce.sh & taskset -c 1 bash examples/lm/reproduce.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-"0 1 2"}
mkdir -p runs/lm
run() {  # name seed [flags...]
  local name=$1 seed=$2; shift 2
  local dir=runs/lm/${name}_s$seed
  if [[ -f $dir/summary.json ]]; then echo "done: $dir"; return; fi
  if ! mkdir "$dir.claim" 2>/dev/null; then echo "taken: $dir"; return; fi
  trap 'rmdir "'"$dir"'.claim" 2>/dev/null; exit 130' INT TERM
  echo "run: $dir"
  $PY -m examples.lm.main --config default --seed "$seed" --workdir "$dir" "$@" \
    >> "$dir.log" 2>&1 || echo "FAILED: $dir (see $dir.log)"
  rmdir "$dir.claim"; trap - INT TERM
}
for seed in $SEEDS; do
  run fp "$seed" --method fp
  for bits in 2 4; do
    for method in bwn-ste laq blaq-m blaq; do
      run "${method}_${bits}bit" "$seed" --method "$method" --bits "$bits"
    done
  done
done
$PY -m examples.lm.report --runs runs/lm
