"""Aggregates ``runs/<config>/<method>_s<seed>/metrics.jsonl`` into markdown tables.

    python -m examples.classification.report --runs runs [--plots runs/plots]
    python -m examples.classification.report --runs runs --paper \
        --configs paper_mnist_lenet5,table1_lenet5

``--paper`` prints, per run group, the paper-protocol table (test accuracy at
the best-validation epoch and at the last; accuracy at equal epochs, at equal
gradient evaluations and at equal training seconds, the budgets being the
nominal ``num_epochs`` and LAQ's final gradient evaluations and seconds; the
training-loss fluctuation; accuracy after 1 and ``num_epochs // 4`` epochs, for
the early convergence of the paper's Fig. 6) and, for runs with per-weight tracking, Table 1
(per sampled weight: latent peak-to-peak amplitude and code flips over the
tracked window). A run directory is ``<name>_s<seed>``; ``<name>`` is the
method, optionally with a suffix such as ``laq_2bit``. A group named
``ablation*`` gets the ``(m, a)`` grid instead, joined by the ``blaq``,
``blaq-m`` and ``laq`` runs of ``--ablation-base`` at the same seeds.

Without ``--paper``:
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

from examples.classification.configs import base
from examples.metrics_io import best_validation
from examples.metrics_io import plot_accuracy
from examples.metrics_io import read_jsonl
from examples.statistics import mean_std as _mean_std
from examples.statistics import t_interval

METHOD_ORDER = ("fp", "bwn-ste", "laq", "blaq")
PAPER_ORDER = ("fp", "bwn-ste", "laq", "blaq", "blaq-m", "laq-as-blaq", "laq-as-blaq-m")


def load_runs(runs_dir: Path, with_config: bool = False) -> dict:
  """``{config: {method: {seed: [rows]}}}`` for runs that finished (all their epochs);
  with ``with_config``, ``{seed: (rows, config)}``."""
  out: dict = {}
  for metrics in sorted(runs_dir.glob("*/*_s*/metrics.jsonl")):
    run = metrics.parent
    method, _, seed = run.name.rpartition("_s")
    if not (run / "config.json").exists() or not seed.isdigit():
      continue  # not a run of this example (runs/lm/...)
    config = json.loads((run / "config.json").read_text())
    rows = read_jsonl(metrics)
    if not rows or rows[-1]["epoch"] != base.resolve(base.from_dict(config)).epochs:
      continue  # unfinished
    out.setdefault(run.parent.name, {}).setdefault(method, {})[int(seed)] = (
        (rows, config) if with_config else rows)
  return out


def _order(names):
  known = [m for m in PAPER_ORDER if m in names]
  return known + sorted(n for n in names if n not in known)


def _at(rows, key, budget):
  """Test accuracy of the last row with ``key <= budget`` (None if there is none)."""
  within = [r for r in rows if r[key] <= budget * (1 + 1e-9)]
  return within[-1]["test_acc"] if within else None


def _cell(xs, scale=100.0, fmt="{:.2f}"):
  got = [x for x in xs if x is not None]
  if not got:
    return "–"
  s = _mean_std(got, scale, fmt)
  return s if len(got) == len(xs) else f"{s} ({len(got)}/{len(xs)})"


def paper_table(group: dict) -> str:
  """The paper-protocol table of one run group ``{name: {seed: (rows, config)}}``."""
  any_rows, any_cfg = next(iter(next(iter(group.values())).values()))
  epochs = any_cfg["num_epochs"]
  ref = group.get("laq") or next(iter(group.values()))
  g_budget = float(np.mean([rows[-1]["grad_evals"] for rows, _ in ref.values()]))
  t_budget = float(np.mean([rows[-1]["train_s"] for rows, _ in ref.values()]))
  early = min(5, epochs)   # early convergence (the paper's Fig. 6)
  lines = [
      f"Budgets: {epochs} epochs; {g_budget:.0f} gradient evaluations and "
      f"{t_budget:.1f} training seconds ({'LAQ' if 'laq' in group else 'first method'}'s "
      "final, mean over seeds). Accuracies in %, mean ± std over seeds.", "",
      "| method | seeds | epochs run | grad. evals | test acc. at best val. | test acc., last "
      f"| at {epochs} epochs | at {g_budget:.0f} grad. evals | at {t_budget:.1f} s "
      f"| loss fluct. (std of Δloss) | flip freq., last epoch | at 1 epoch | at {early} epochs "
      "| training s |",
      "|" + "---|" * 14,
  ]
  for name in _order(group):
    runs = list(group[name].values())
    rows_l = [rows for rows, _ in runs]
    best = [r for r in (_best(rows) for rows in rows_l)]
    diff_std = [np.mean([r.get('loss_diff_std', np.nan) for r in rows]) for rows in rows_l]
    lines.append(
        f"| {name} | {len(runs)} | {rows_l[0][-1]['epoch']} "
        f"| {_mean_std([rows[-1]['grad_evals'] for rows in rows_l], fmt='{:.0f}')} "
        f"| {_cell(best)} | {_cell([rows[-1]['test_acc'] for rows in rows_l])} "
        f"| {_cell([_at(rows, 'epoch', epochs) for rows in rows_l])} "
        f"| {_cell([_at(rows, 'grad_evals', g_budget) for rows in rows_l])} "
        f"| {_cell([_at(rows, 'train_s', t_budget) for rows in rows_l])} "
        f"| {_cell(diff_std, 1.0, '{:.4f}')} "
        f"| {_cell([rows[-1]['osc_flip_frequency'] for rows in rows_l], 1.0, '{:.2e}')} "
        f"| {_cell([_at(rows, 'epoch', 1) for rows in rows_l])} "
        f"| {_cell([_at(rows, 'epoch', early) for rows in rows_l])} "
        f"| {_mean_std([rows[-1]['train_s'] for rows in rows_l], fmt='{:.0f}')} |")
  return "\n".join(lines)


PAIRS = (("blaq-m", "laq"), ("blaq-m", "laq-as-blaq-m"), ("blaq", "laq"),
         ("blaq", "laq-as-blaq-m"), ("blaq", "laq-as-blaq"))
def paired_table(group: dict) -> str | None:
  """Per-seed paired differences of test accuracy (percentage points) between
  the methods of :data:`PAIRS` present in ``group``, with the 95% t-interval of
  their mean, at the best-validation epoch and at the last; None if no pair."""
  lines = []
  for a, b in PAIRS:
    seeds = sorted(set(group.get(a, {})) & set(group.get(b, {})))
    if not seeds:
      continue
    for label, value in (("best val.", lambda rows: _best(rows)),
                         ("last", lambda rows: rows[-1]["test_acc"])):
      va = [value(group[a][s][0]) for s in seeds]
      vb = [value(group[b][s][0]) for s in seeds]
      if any(v is None for v in va + vb):
        continue
      diffs = [100 * (x - y) for x, y in zip(va, vb)]
      mean, low, high = t_interval(diffs)
      lines.append(f"| {a} − {b} | {label} | {', '.join(map(str, seeds))} "
                   f"| {', '.join(f'{d:+.2f}' for d in diffs)} | {mean:+.3f} "
                   f"| [{low:+.3f}, {high:+.3f}] |")
  if not lines:
    return None
  return "\n".join([
      "Paired differences of test accuracy (percentage points, same seed), with the "
      "95% t-interval of their mean:", "",
      "| pair | epoch | seeds | per seed | mean | 95% interval |", "|---|---|---|---|---|---|",
      *lines])


def _best(rows):
  """Test accuracy at the best-validation epoch (None without validation)."""
  return best_validation(rows).get("test_acc_at_best_val")


TABLE1_KEYS = (("tw_amp_max", "max latent amplitude", "{:.3f}"),
               ("tw_amp_median", "median latent amplitude", "{:.2e}"),
               ("tw_flips_max", "max flips", "{:.1f}"),
               ("tw_flips_mean", "mean flips", "{:.2f}"),
               ("tw_flipped_frac", "weights that flip (%)", "{:.1f}"),
               ("tw_top_amp", "amplitude of the most-flipping weight", "{:.3f}"))


def table1(group: dict) -> str | None:
  """Table 1 per sampled weight (last row of each tracked run), or None."""
  names = [n for n in _order(group)
           if all("tw_amp_max" in rows[-1] for rows, _ in group[n].values())]
  if not names:
    return None
  _, cfg = next(iter(group[names[0]].values()))
  steps = next(iter(group[names[0]].values()))[0][-1]["tw_window_steps"]
  lines = [f"Per-weight oscillation over the last {cfg.get('track_last_epochs', 1)} epoch(s) "
           f"({steps} steps), {cfg.get('track_weights')} sampled weights (the same ones for "
           "every method at a given seed); amplitude = peak-to-peak range of the latent "
           "weight, flips = changes of its quantized code; mean ± std over seeds.", "",
           "| run | bits | seeds | " + " | ".join(t for _, t, _ in TABLE1_KEYS) + " |",
           "|" + "---|" * (3 + len(TABLE1_KEYS))]
  for name in names:
    runs = list(group[name].values())
    cells = []
    for key, _, fmt in TABLE1_KEYS:
      scale = 100.0 if key == "tw_flipped_frac" else 1.0
      cells.append(_mean_std([rows[-1][key] for rows, _ in runs], scale, fmt))
    lines.append(f"| {name} | {runs[0][1]['bits']} | {len(runs)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def ablation_table(group: dict, base: dict | None = None, base_name: str = "") -> str:
  """The ``(m, a)`` grid of a group of ``blaq-m`` runs; from ``base`` (the group the
  ablation varies), its ``blaq`` (``m = 1``), ``blaq-m`` and ``laq`` at the same seeds."""
  seeds = sorted({s for runs in group.values() for s in runs})
  entries = []
  for name, runs in group.items():
    cfg = next(iter(runs.values()))[1]
    entries.append((cfg["m"], cfg["a"], name, runs))
  for name in ("blaq", "blaq-m", "laq"):
    runs = {s: r for s, r in (base or {}).get(name, {}).items() if s in seeds}
    if runs:
      cfg = next(iter(runs.values()))[1]
      m = {"blaq": 1, "laq": float("inf")}.get(name, cfg["m"])
      entries.append((m, cfg["a"] if name != "laq" else None, f"{base_name}/{name}", runs))
  lines = [f"Seeds {', '.join(map(str, seeds))}; accuracies in %.", "",
           "| m | a | seeds | test acc. at best val. | test acc., last | grad. evals | run |",
           "|" + "---|" * 7]
  for m, a, name, runs in sorted(entries, key=lambda e: (e[0], e[1] or 0)):
    rows_l = [rows for rows, _ in runs.values()]
    lines.append(
        f"| {'–' if m == float('inf') else m} | {'–' if a is None else a} | {len(rows_l)} "
        f"| {_cell([_best(rows) for rows in rows_l])} "
        f"| {_cell([rows[-1]['test_acc'] for rows in rows_l])} "
        f"| {_mean_std([rows[-1]['grad_evals'] for rows in rows_l], fmt='{:.0f}')} | {name} |")
  return "\n".join(lines)


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


def plot(config: str, config_runs: dict, out_dir: Path, names=None, loss: bool = False) -> None:
  """Test accuracy (mean over seeds) per epoch, gradient evaluation and second to
  ``out_dir/<config>.png``; with ``loss``, first the training loss per epoch
  (mean, shaded between the seeds' lowest and highest: the paper's Fig. 5)."""
  names = names or [m for m in METHOD_ORDER if m in config_runs]
  plot_accuracy({name: list(config_runs[name].values()) for name in names},
                out_dir / f"{config}.png", title=config, loss=loss)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", default="runs")
  parser.add_argument("--plots", default=None, help="directory for accuracy plots")
  parser.add_argument("--configs", default="mnist_mlp,mnist_lenet5,fashion_lenet5,cifar10_vgg",
                      help="comma-separated sub-directories of --runs, in this order")
  parser.add_argument("--paper", action="store_true",
                      help="the paper-protocol tables (best validation, equal budgets, Table 1)")
  parser.add_argument("--ablation-base", default="paper_mnist_lenet5",
                      help="the group whose blaq / blaq-m / laq runs join the (m, a) grid of a "
                           "group named ablation*")
  args = parser.parse_args(argv)
  if args.paper:
    runs = load_runs(Path(args.runs), with_config=True)
    for config in args.configs.split(","):
      if config not in runs:
        continue
      print(f"### {config}\n")
      if config.startswith("ablation"):
        print(ablation_table(runs[config], runs.get(args.ablation_base), args.ablation_base))
        print()
        continue
      print(paper_table(runs[config]))
      paired = paired_table(runs[config])
      if paired:
        print("\n" + paired)
      t1 = table1(runs[config])
      if t1:
        print("\n" + t1)
      print()
      if args.plots:
        group = {name: {seed: rows for seed, (rows, _) in seeds.items()}
                 for name, seeds in runs[config].items()}
        plot(config, group, Path(args.plots), names=_order(group), loss=True)
    return
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
