#!/usr/bin/env bash
# Reproduces the tables of examples/README.md: the BLAQ paper's protocol
# (configs/paper.py: squared hinge, BN with eps on the std, 50k/10k (45k/5k)
# validation split, step schedules, test accuracy at the best-validation epoch).
# Usage: bash examples/classification/reproduce.sh <target>
# Each run writes runs/<group>/<name>_s<seed>/ (metrics.jsonl, summary.json, ...);
# finished runs are skipped, interrupted ones resume from their checkpoint
# (appending to their log, runs/<group>/<name>_s<seed>.log).
# Two copies at once use both cores of a 2-core machine best:
#   taskset -c 0 bash reproduce.sh table4_lenet & taskset -c 1 bash reproduce.sh table4_lenet
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
# Where the loaders look for MNIST / Fashion-MNIST / CIFAR-10 after --data-dir.
export BLAQ_DATA_DIR=${BLAQ_DATA_DIR:-data}
# XLA:CPU takes a step's temporaries from malloc; with glibc's mmap off, freed
# memory is reused instead of being unmapped and page-faulted again on every
# step (4-29 ms a step on the 2048-wide MLP: benchmarks/README.md). Ignored
# where the C library is not glibc; set GLIBC_TUNABLES to override.
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=100000000000}
what=${1:?"usage: reproduce.sh <target> (the targets are listed in the script)"}

# Targets (CPU unless marked GPU; sizes under SCALE=cpu, below):
#   table4_lenet      paper_mnist_lenet5, 20 epochs, with per-weight tracking (Table 1, 1 bit)
#   fashion_lenet     paper_fashion_lenet5, the same on Fashion-MNIST
#   table1            per-weight Table 1 at 2 and 4 bits: laq / blaq / blaq-m (TABLE1_SEEDS)
#   ablation          blaq-m on a small (m, a) grid on LeNet5 (ABLATION_SEEDS)
#   table3_mlp512     paper_mnist_mlp at width 512 (a cheaper stand-in for table3_mlp), 50 epochs
#   appendix_lenet    paper_mnist_lenet5 with the appendix's literal schedule
#   imagefolder       CIFAR-10 as PNG files through the ResNet18 example's grain pipeline
#   table3_mlp        paper_mnist_mlp at the paper's width 2048 (METHODS default
#                     "fp laq blaq-m"); with SCALE=full 1.5-2 hours a run on one core
#                     (80-155 s an epoch, fp to laq, with a run on each of 2 cores)
#   gpu_mlp2048       (GPU) paper_mnist_mlp at full width, all methods
#   gpu_cifar         (GPU) paper_cifar10_vgg
#   paper_report      the tables of all of the above (and runs/plots/<group>.png)
# The first five, table4_lenet and fashion_lenet in particular, run fp, bwn-ste,
# laq, blaq (two-stage update every step), blaq-m (the paper's period) and LAQ
# at each BLAQ's gradient budget (laq-as-blaq, laq-as-blaq-m), 3 seeds (SEEDS).
PAPER_METHODS=${PAPER_METHODS:-"fp bwn-ste laq blaq blaq-m laq-as-blaq laq-as-blaq-m"}
SEEDS=${SEEDS:-"0 1 2"}

# SCALE=cpu (the default) keeps the models, epochs and schedules but shrinks the
# training sets, so that the LeNet5 tables fit about an hour of a 2-core CPU
# (examples/README.md); SCALE=full trains on the paper's 50k images.
# Full-size runs go to their own groups (runs/<group>_full/), so that the two
# scales never mix in one table.
SCALE=${SCALE:-cpu}
if [[ $SCALE == cpu ]]; then
  LENET_SCALE=(--train-subset 10000 --val-split 5000)   # 5,000 train / 5,000 val images
  MLP_SCALE=(--train-subset 15000 --val-split 5000)     # 10,000 train / 5,000 val images
  SUFFIX=
elif [[ $SCALE == full ]]; then
  LENET_SCALE=(); MLP_SCALE=(); SUFFIX=_full
else
  echo "SCALE must be cpu or full, got '$SCALE'" >&2; exit 2
fi

# Several copies of this script may run at once (e.g. one per core under
# `taskset -c N`): each run is claimed with an atomic mkdir, so each copy takes
# the next run nobody has started. An interrupted run resumes from its checkpoint.
prun() {  # group name config seed [flags...]: runs/<group>/<name>_s<seed>
  local group=$1$SUFFIX name=$2 config=$3 seed=$4; shift 4
  local dir=runs/$group/${name}_s$seed
  mkdir -p runs/$group
  if [[ -f $dir/model_packed.npz ]]; then echo "done: $dir"; return; fi
  if ! mkdir "$dir.claim" 2>/dev/null; then echo "taken: $dir"; return; fi
  trap 'rmdir "'"$dir"'.claim" 2>/dev/null; exit 130' INT TERM
  echo "run: $dir"
  $PY -m examples.classification.main --config "$config" --seed "$seed" --workdir "$dir" \
    --no-progress "$@" >> "$dir.log" 2>&1 || echo "FAILED: $dir (see $dir.log)"
  rmdir "$dir.claim"; trap - INT TERM
}

paper_all_methods() {  # group config [flags...]
  local group=$1 config=$2; shift 2
  for seed in $SEEDS; do
    for method in $PAPER_METHODS; do
      prun "$group" "$method" "$config" "$seed" --method "$method" "$@"
    done
  done
}

MLP512='model_kwargs={"hidden": (512, 512, 512), "head_norm": True, "bn_eps_on_std": True, "bn_eps": 1e-4}'
TRACK=(--track-weights 300 --track-last-epochs 2)   # per-weight Table 1 (1 bit) on the side
case $what in
  table3_mlp512)
    paper_all_methods paper_mnist_mlp512 paper_mnist_mlp --set "$MLP512" "${MLP_SCALE[@]}" ;;
  table4_lenet)
    paper_all_methods paper_mnist_lenet5 paper_mnist_lenet5 "${LENET_SCALE[@]}" "${TRACK[@]}" ;;
  fashion_lenet)
    paper_all_methods paper_fashion_lenet5 paper_fashion_lenet5 "${LENET_SCALE[@]}" "${TRACK[@]}" ;;
  appendix_lenet)
    paper_all_methods paper_mnist_lenet5_appendix paper_mnist_lenet5 --schedule-reading appendix \
      "${LENET_SCALE[@]}" ;;
  table1)  # 2 and 4 bits; the 1-bit rows come from table4_lenet's runs
    for seed in ${TABLE1_SEEDS:-0}; do
      for bits in 2 4; do
        for method in laq blaq blaq-m; do
          prun table1_lenet5 "${method}_${bits}bit" paper_mnist_lenet5 "$seed" --method "$method" \
            --bits "$bits" "${LENET_SCALE[@]}" "${TRACK[@]}"
        done
      done
    done ;;
  ablation)  # (m, a) = (5, 0.6) is table4_lenet's blaq-m; m = 1 is its blaq (a = 0.6)
    for seed in ${ABLATION_SEEDS:-0}; do
      for ma in "5 0.3" "5 0.9" "10 0.3" "10 0.6" "10 0.9" "2 0.6"; do
        set -- $ma
        prun ablation_lenet5 "blaq-m_m${1}_a${2}" paper_mnist_lenet5 "$seed" --method blaq-m \
          --m "$1" --a "$2" "${LENET_SCALE[@]}"
      done
    done ;;
  imagefolder)
    # CIFAR-10 (cifar-10-batches-py, e.g. from examples.cifar10_from_tfjs) -> PNG ImageFolder,
    # then ResNet18 at 32x32 through grain for a few hundred steps, LAQ and BLAQ.
    $PY -m examples.cifar10_to_imagefolder --data-dir data/cifar10 --out data/cifar10_imagefolder
    for opt in laq blaq; do
      $PY -m examples.imagenet_resnet18.main --config cifar_imagefolder \
        --data-dir data/cifar10_imagefolder --method "$opt" \
        --workdir runs/cifar10_imagefolder/$opt > runs/cifar10_imagefolder_$opt.log 2>&1 \
        || echo "FAILED: cifar10_imagefolder $opt"
    done ;;
  table3_mlp)
    PAPER_METHODS=${METHODS:-"fp laq blaq-m"} paper_all_methods paper_mnist_mlp paper_mnist_mlp \
      "${MLP_SCALE[@]}" ;;
  gpu_mlp2048) paper_all_methods paper_mnist_mlp paper_mnist_mlp ;;
  gpu_cifar) paper_all_methods paper_cifar10_vgg paper_cifar10_vgg --data-dir data/cifar10 ;;
  paper_report)
    $PY -m examples.classification.report --runs runs --paper --plots runs/plots --configs \
      paper_mnist_mlp512,paper_mnist_mlp,paper_mnist_lenet5,paper_fashion_lenet5,paper_mnist_lenet5_full,paper_mnist_mlp_full,paper_fashion_lenet5_full,paper_mnist_lenet5_appendix,table1_lenet5,ablation_lenet5,paper_cifar10_vgg ;;
esac
