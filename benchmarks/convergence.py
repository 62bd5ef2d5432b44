"""Test accuracy per epoch, per gradient evaluation and per second: is BLAQ's
second gradient evaluation worth its cost?

Drives the example training program
(``examples.classification.train.train_and_evaluate``) over data sets x
methods x seeds and compares, on the same footing:

* ``laq``     LAQ for ``--epochs`` epochs (one gradient evaluation per step);
* ``blaq``    BLAQ for ``--epochs`` epochs (two per step);
* ``laq_2x``  LAQ for ``2 x --epochs`` epochs: the same number of gradient
  evaluations as ``blaq`` (its cosine schedule spans the longer run);

and optionally any other method of the training program (``fp``, ``bwn-ste``,
...; a suffix ``_2x`` runs a method twice as long). Every run writes its
per-epoch ``metrics.jsonl`` (test accuracy with
the quantized weights, gradient evaluations, training seconds, flip rate of
the quantized weights) under ``--out``; finished runs are reused, so an
interrupted sweep continues where it stopped.

Outputs: ``summary.json`` (every row of every run), ``summary.md`` (one table
per data set: final accuracy, accuracy at equal gradient evaluations and at
equal seconds, flip rate) and ``curves_<dataset>.png``.

Usage::

  python -m benchmarks.convergence                       # MNIST + Fashion-MNIST, 3 seeds
  python -m benchmarks.convergence --datasets mnist --seeds 0 --epochs 2 --train-subset 2000

Seconds are training wall-clock seconds of the jitted steps (evaluation
excluded); on a shared machine they carry its noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
from pathlib import Path
from collections.abc import Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]


def base_methods() -> tuple[str, ...]:
  from examples.methods import METHODS
  return tuple(METHODS)


def flip_frequency(row: dict) -> float:
  """Code flips of the quantized weights per weight per step in one epoch."""
  return row["osc_flip_frequency"] if "osc_flip_frequency" in row else row["flip_rate"]


def parse_method(name: str) -> tuple[str, int]:
  """``"laq_2x"`` -> ``("laq", 2)``; ``"blaq"`` -> ``("blaq", 1)``; the base is
  any method of ``examples/methods.py``."""
  base, mult = name, 1
  if "_" in name and name.rsplit("_", 1)[1].endswith("x"):
    base, tail = name.rsplit("_", 1)
    try:
      mult = int(tail[:-1])
    except ValueError:
      mult = 0
  if base not in base_methods() or mult < 1:
    raise ValueError(f"--methods: unknown method {name!r}; expected one of {base_methods()}, "
                     "optionally with a length multiplier such as 'laq_2x'")
  return base, mult


def make_config(dataset: str, method: str, seed: int, *, epochs: int, bits: int,
                model: str, hidden: Sequence[int] | None, train_subset: int | None,
                test_subset: int | None, batch_size: int, learning_rate: float,
                a: float, data_dir: str | None):
  from examples.classification.configs.base import Config
  base, mult = parse_method(method)
  model_kwargs = {"hidden": tuple(hidden)} if model == "mlp" and hidden else {}
  return Config(dataset=dataset, model=model, model_kwargs=model_kwargs, method=base,
                bits=bits, a=a, learning_rate=learning_rate, num_epochs=epochs * mult,
                batch_size=batch_size, seed=seed, train_subset=train_subset,
                test_subset=test_subset, data_dir=data_dir, checkpoint=False,
                export=False, plot=False, progress=False)


def read_rows(path: Path) -> list[dict]:
  from examples.metrics_io import read_jsonl
  return read_jsonl(path)


def run_one(config, workdir: Path, reuse: bool = True) -> list[dict]:
  """Trains one configuration (or reuses a finished run with the same config)."""
  from examples.classification.train import train_and_evaluate
  metrics = workdir / "metrics.jsonl"
  cfg_path = workdir / "config.json"
  if reuse and cfg_path.exists():
    same = json.loads(cfg_path.read_text()) == json.loads(
        json.dumps(dataclasses.asdict(config)))
    rows = read_rows(metrics)
    if same and len(rows) == config.num_epochs:
      print(f"reusing {workdir}", flush=True)
      return rows
  if metrics.exists():
    metrics.unlink()
  train_and_evaluate(config, workdir)
  return read_rows(metrics)


# ----------------------------------------------------------------------------
# Summaries


def value_within(rows: list[dict], key: str, budget: float, field: str = "test_acc"):
  """``field`` at the last epoch with ``rows[key] <= budget`` (None if none)."""
  ok = [r for r in rows if r[key] <= budget * (1 + 1e-9)]
  return ok[-1][field] if ok else None


def mean_std(xs):
  xs = [x for x in xs if x is not None]
  if not xs:
    return None, None
  return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(runs: dict) -> dict:
  """``runs[dataset][method][seed] = rows`` -> per data set and method statistics.

  Budgets: ``G`` = the gradient evaluations of one plain ``laq`` run (else the
  smallest run), ``T`` = the mean training seconds of ``blaq`` (else of the
  longest run).
  """
  out = {}
  for dataset, by_method in runs.items():
    finals = {m: [rows[-1] for rows in seeds.values()] for m, seeds in by_method.items()}
    if "laq" in finals:
      g1 = statistics.fmean(r["grad_evals"] for r in finals["laq"])
    else:
      g1 = min(r["grad_evals"] for rs in finals.values() for r in rs)
    if "blaq" in finals:
      t_ref = statistics.fmean(r["train_s"] for r in finals["blaq"])
    else:
      t_ref = max(r["train_s"] for rs in finals.values() for r in rs)
    table = {}
    for m, seeds in by_method.items():
      runs_m = list(seeds.values())
      acc, acc_sd = mean_std([rows[-1]["test_acc"] for rows in runs_m])
      best, _ = mean_std([max(r["test_acc"] for r in rows) for rows in runs_m])
      at_g1, at_g1_sd = mean_std([value_within(rows, "grad_evals", g1) for rows in runs_m])
      at_g2, at_g2_sd = mean_std([value_within(rows, "grad_evals", 2 * g1) for rows in runs_m])
      at_t, at_t_sd = mean_std([value_within(rows, "train_s", t_ref) for rows in runs_m])
      flips, _ = mean_std([statistics.fmean(flip_frequency(r) for r in rows) for rows in runs_m])
      flips_last, _ = mean_std([flip_frequency(rows[-1]) for rows in runs_m])
      secs, _ = mean_std([rows[-1]["train_s"] for rows in runs_m])
      table[m] = {
          "seeds": sorted(seeds), "epochs": runs_m[0][-1]["epoch"],
          "grad_evals": runs_m[0][-1]["grad_evals"], "train_s": secs,
          "ms_per_step": 1e3 * secs / runs_m[0][-1]["step"],
          "final_acc": acc, "final_acc_sd": acc_sd, "best_acc": best,
          "acc_at_G": at_g1, "acc_at_G_sd": at_g1_sd,
          "acc_at_2G": at_g2, "acc_at_2G_sd": at_g2_sd,
          "acc_at_T": at_t, "acc_at_T_sd": at_t_sd,
          "flip_rate_mean": flips, "flip_rate_last": flips_last,
      }
    out[dataset] = {"G": g1, "T": t_ref, "methods": table}
  return out


def pct(x, sd=None):
  if x is None:
    return "–"
  return f"{100 * x:.2f}" + ("" if sd is None else f" ± {100 * sd:.2f}")


def markdown(summary: dict, meta: dict) -> str:
  lines = [f"`{meta['command']}` — {meta['date_utc']} UTC, commit {meta['commit']}, "
           f"jax {meta['jax']}, {meta['backend']} ({meta['cpu_count']} cores, shared); "
           f"model {meta['model']}, {meta['bits']}-bit, train subset "
           f"{meta['train_subset'] or 'all'}, seeds {meta['seeds']}. Accuracies are test "
           "accuracy (%) with the quantized weights, mean ± std over seeds."]
  for dataset, s in summary.items():
    lines += ["", f"**{dataset}** (G = {s['G']:.0f} gradient evaluations = one LAQ run; "
              f"T = {s['T']:.1f} s = BLAQ's mean training time)", "",
              "| method | epochs | grad evals | train s | ms/step | final acc | acc @ G "
              "| acc @ 2G | acc @ T s | flips/weight/step |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in s["methods"].items():
      lines.append(
          f"| {m} | {r['epochs']} | {r['grad_evals']} | {r['train_s']:.1f} | "
          f"{r['ms_per_step']:.1f} | {pct(r['final_acc'], r['final_acc_sd'])} | "
          f"{pct(r['acc_at_G'], r['acc_at_G_sd'])} | {pct(r['acc_at_2G'], r['acc_at_2G_sd'])} | "
          f"{pct(r['acc_at_T'], r['acc_at_T_sd'])} | {r['flip_rate_mean']:.2e} |")
  return "\n".join(lines) + "\n"


def plot(runs: dict, out_dir: Path) -> list[Path]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = []
  keys = (("epoch", "epoch"), ("grad_evals", "gradient evaluations"),
          ("train_s", "training seconds"))
  for dataset, by_method in runs.items():
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for m, seeds in by_method.items():
      runs_m = list(seeds.values())
      n = min(len(r) for r in runs_m)
      acc = np.array([[100 * r["test_acc"] for r in rows[:n]] for rows in runs_m])
      flips = np.array([[flip_frequency(r) for r in rows[:n]] for rows in runs_m])
      for ax, (key, _) in zip(axes[:3], keys):
        x = np.array([[r[key] for r in rows[:n]] for rows in runs_m]).mean(0)
        line, = ax.plot(x, acc.mean(0), marker="o", ms=3, label=m)
        ax.fill_between(x, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.15)
      axes[3].semilogy(np.arange(1, n + 1), flips.mean(0), marker="o", ms=3, label=m)
    for ax, (_, label) in zip(axes[:3], keys):
      ax.set_xlabel(label)
      ax.set_ylabel("test accuracy (%)")
      ax.grid(alpha=0.3)
    axes[3].set_xlabel("epoch")
    axes[3].set_ylabel("flips / weight / step")
    axes[3].grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{dataset}: mean over seeds (band: min-max)")
    fig.tight_layout()
    path = out_dir / f"curves_{dataset}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
  return paths


# ----------------------------------------------------------------------------


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.convergence", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--datasets", default="mnist,fashion_mnist")
  p.add_argument("--methods", default="laq,blaq,laq_2x")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--epochs", type=int, default=5, help="epochs of laq / blaq (laq_2x: twice)")
  p.add_argument("--bits", type=int, default=1)
  p.add_argument("--model", default="mlp", help="a model of examples/classification/models.py")
  p.add_argument("--hidden", default="512,512,512",
                 help="MLP hidden sizes (the paper's: 2048,2048,2048)")
  p.add_argument("--train-subset", type=int, default=20000,
                 help="first n training examples (0: all 60000)")
  p.add_argument("--test-subset", type=int, default=0, help="0: the whole test set")
  p.add_argument("--batch-size", type=int, default=100)
  p.add_argument("--learning-rate", type=float, default=1e-3)
  p.add_argument("--a", type=float, default=0.6, help="BLAQ's mixing weight")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--out", default=str(REPO_ROOT / "outputs" / "convergence"))
  p.add_argument("--no-reuse", action="store_true", help="retrain finished runs")
  return p.parse_args(argv)


def environment(args, argv) -> dict:
  import jax
  from benchmarks.step_time import git_commit
  argv = sys.argv[1:] if argv is None else argv
  return {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
      "commit": git_commit(), "jax": jax.__version__, "backend": jax.default_backend(),
      "cpu_count": os.cpu_count(),
      "command": "python -m benchmarks.convergence " + " ".join(argv),
      "model": args.model + (f" {args.hidden}" if args.model == "mlp" else ""),
      "bits": args.bits, "train_subset": args.train_subset or None, "seeds": args.seeds,
  }


def main(argv=None) -> dict:
  args = parse_args(argv)
  datasets = [d for d in args.datasets.split(",") if d]
  methods = [m for m in args.methods.split(",") if m]
  for m in methods:
    parse_method(m)
  seeds = [int(s) for s in args.seeds.split(",") if s]
  hidden = [int(h) for h in args.hidden.split(",") if h] if args.hidden else None
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  runs: dict = {}
  for dataset in datasets:
    for method in methods:
      for seed in seeds:
        config = make_config(
            dataset, method, seed, epochs=args.epochs, bits=args.bits, model=args.model,
            hidden=hidden, train_subset=args.train_subset or None,
            test_subset=args.test_subset or None, batch_size=args.batch_size,
            learning_rate=args.learning_rate, a=args.a, data_dir=args.data_dir)
        print(f"== {dataset} {method} seed {seed} ({config.num_epochs} epochs)", flush=True)
        rows = run_one(config, out / dataset / f"{method}_s{seed}", reuse=not args.no_reuse)
        runs.setdefault(dataset, {}).setdefault(method, {})[seed] = rows

  summary = summarize(runs)
  meta = environment(args, argv)
  (out / "summary.json").write_text(json.dumps(
      {"meta": meta, "summary": summary, "runs": runs}, indent=1))
  md = markdown(summary, meta)
  (out / "summary.md").write_text(md)
  pngs = plot(runs, out)
  print(md)
  print(f"wrote {out / 'summary.json'}, {out / 'summary.md'} and "
        f"{', '.join(str(p) for p in pngs)}")
  return {"summary": summary, "runs": runs, "pngs": pngs}


if __name__ == "__main__":
  main()
