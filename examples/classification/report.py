"""Aggregates ``runs/<config>/<method>_s<seed>/metrics.jsonl`` into markdown tables.

    python -m examples.classification.report --runs runs [--plots runs/plots]

Per (config, method), over the seeds found: final test accuracy (mean ± std,
quantized weights), the epochs / gradient evaluations / training seconds to
first reach LAQ's final accuracy (LAQ's mean over seeds; mean over the seeds
that reach it, with how many did), and the oscillation statistics of the last
epoch and averaged over the epochs (flip frequency: code flips of the quantized
weights per weight per step; amplitude: mean peak-to-peak range of each latent
weight over the epoch).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

METHOD_ORDER = ("fp", "bwn-ste", "laq", "blaq")


def load_runs(runs_dir: Path) -> dict:
  """``{config: {method: {seed: [rows]}}}`` for runs that finished (packed model written)."""
  out: dict = {}
  for metrics in sorted(runs_dir.glob("*/*_s*/metrics.jsonl")):
    run = metrics.parent
    method, _, seed = run.name.rpartition("_s")
    config = json.loads((run / "config.json").read_text())
    rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    if not rows or rows[-1]["epoch"] != config["num_epochs"]:
      continue  # unfinished
    out.setdefault(run.parent.name, {}).setdefault(method, {})[int(seed)] = rows
  return out


def _mean_std(xs, scale=1.0, fmt="{:.2f}"):
  xs = np.asarray(xs, float) * scale
  if len(xs) == 1:
    return fmt.format(xs[0])
  return f"{fmt.format(xs.mean())} ± {fmt.format(xs.std(ddof=1))}"


def table(config_runs: dict) -> str:
  laq = config_runs.get("laq", {})
  target = np.mean([rows[-1]["test_acc"] for rows in laq.values()]) if laq else None
  head = ("| method | seeds | test acc. (%) | epochs to LAQ's final | grad. evals to LAQ's final "
          "| train s to LAQ's final | flip freq., last epoch | flip freq., mean over epochs "
          "| latent amplitude, last epoch |")
  lines = [head, "|" + "---|" * 9]
  for method in [m for m in METHOD_ORDER if m in config_runs]:
    seeds = config_runs[method]
    finals = [rows[-1] for rows in seeds.values()]
    reach = {"epoch": [], "grad_evals": [], "train_s": []}
    for rows in seeds.values():
      hit = next((r for r in rows if target is not None and r["test_acc"] >= target), None)
      if hit is not None:
        for k in reach:
          reach[k].append(hit[k])
    n = len(seeds)
    mean_freq = [np.mean([r["osc_flip_frequency"] for r in rows]) for rows in seeds.values()]

    def cell(key, fmt):
      if target is None:
        return "–"
      if not reach[key]:
        return f"not reached (0/{n})"
      s = _mean_std(reach[key], fmt=fmt)
      return s if len(reach[key]) == n else f"{s} ({len(reach[key])}/{n})"

    lines.append(
        f"| {method} | {n} | {_mean_std([r['test_acc'] for r in finals], 100)} "
        f"| {cell('epoch', '{:.1f}')} | {cell('grad_evals', '{:.0f}')} "
        f"| {cell('train_s', '{:.0f}')} "
        f"| {_mean_std([r['osc_flip_frequency'] for r in finals], fmt='{:.2e}')} "
        f"| {_mean_std(mean_freq, fmt='{:.2e}')} "
        f"| {_mean_std([r['osc_amplitude_mean'] for r in finals], fmt='{:.2e}')} |")
  if target is not None:
    lines.append(f"\nLAQ's final accuracy (the target): {100 * target:.2f}%.")
  return "\n".join(lines)


def plot(config: str, config_runs: dict, out_dir: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for method in [m for m in METHOD_ORDER if m in config_runs]:
    runs = list(config_runs[method].values())
    n = min(len(r) for r in runs)
    acc = np.mean([[100 * r["test_acc"] for r in rows[:n]] for rows in runs], 0)
    for ax, key in zip(axes, ("epoch", "grad_evals", "train_s")):
      x = np.mean([[r[key] for r in rows[:n]] for rows in runs], 0)
      ax.plot(x, acc, marker="o", ms=3, label=method)
  for ax, xl in zip(axes, ("epoch", "gradient evaluations", "training seconds")):
    ax.set_xlabel(xl)
    ax.set_ylabel("test accuracy (%), mean over seeds")
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle(config)
  fig.tight_layout()
  out_dir.mkdir(parents=True, exist_ok=True)
  fig.savefig(out_dir / f"{config}.png", dpi=100)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", default="runs")
  parser.add_argument("--plots", default=None, help="directory for accuracy plots")
  parser.add_argument("--configs", default="mnist_mlp,mnist_lenet5,fashion_lenet5,cifar10_vgg",
                      help="comma-separated sub-directories of --runs, in this order")
  args = parser.parse_args(argv)
  runs = load_runs(Path(args.runs))
  for config in args.configs.split(","):
    if config not in runs:
      continue
    config_runs = runs[config]
    any_cfg = next(iter(next(iter(config_runs.values())).values()))
    print(f"### {config} ({len(any_cfg)} epochs)\n")
    print(table(config_runs))
    print()
    if args.plots:
      plot(config, config_runs, Path(args.plots))


if __name__ == "__main__":
  main()
