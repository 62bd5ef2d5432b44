"""The examples' per-epoch metrics: reading ``metrics.jsonl``, the test accuracy
at the best-validation epoch, and the accuracy plots.

Used by the classification example (its summary and ``accuracy.png``) and its
report (tables and ``runs/plots/<group>.png``). Writing the logs is
``examples/checkpointing.py``'s (atomic appends, cut back on resume).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_jsonl(path) -> list[dict]:
  """The rows of a JSONL file (none if it does not exist)."""
  path = Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def best_validation(rows: list[dict]) -> dict:
  """Test accuracy at the best-validation epoch (the first of ties) and at the last."""
  out = {"epochs": len(rows), "test_acc_last": rows[-1]["test_acc"] if rows else None}
  with_val = [r for r in rows if r.get("val_acc") is not None]
  if with_val:
    best = max(with_val, key=lambda r: (r["val_acc"], -r["epoch"]))
    out.update(best_val_epoch=best["epoch"], best_val_acc=best["val_acc"],
               test_acc_at_best_val=best["test_acc"])
  return out


def plot_accuracy(curves: dict, out_path, title: str = "", loss: bool = False) -> None:
  """Test accuracy per epoch, per gradient evaluation and per training second.

  ``curves`` is ``{label: [rows of one run, ...]}``: one line per label, the
  mean over its runs (seeds), each cut to the shortest; a label None draws no
  legend. With ``loss``, a first panel shows the training loss per epoch
  (mean, shaded between the runs' lowest and highest: the paper's Fig. 5).
  The file is written to a temporary name and renamed, so a reader never
  sees half a plot.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  fig, axes = plt.subplots(1, 3 + loss, figsize=(4.3 * (3 + loss), 3.6))
  several = any(len(runs) > 1 for runs in curves.values())
  for label, runs in curves.items():
    n = min(len(rows) for rows in runs)
    mean = lambda key, scale=1.0: np.mean([[scale * r[key] for r in rows[:n]] for rows in runs],
                                          0)
    acc = mean("test_acc", 100.0)
    if loss:
      train = np.asarray([[r["train_loss"] for r in rows[:n]] for rows in runs])
      epochs = mean("epoch")
      line, = axes[0].plot(epochs, train.mean(0), label=label)
      axes[0].fill_between(epochs, train.min(0), train.max(0), color=line.get_color(), alpha=0.2)
    for ax, key in zip(axes[loss:], ("epoch", "grad_evals", "train_s")):
      ax.plot(mean(key), acc, marker="o", ms=3, label=label)
  if loss:
    axes[0].set(xlabel="epoch", ylabel="training loss", yscale="log")
    axes[0].grid(alpha=0.3)
  for ax, xl in zip(axes[loss:], ("epoch", "gradient evaluations", "training seconds")):
    ax.set_xlabel(xl)
    ax.set_ylabel("test accuracy (%)" + (", mean over seeds" if several else ""))
    ax.grid(alpha=0.3)
  if any(label is not None for label in curves):
    axes[-1].legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  out_path = Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  tmp = out_path.with_name(f".{out_path.stem}.tmp{out_path.suffix}")
  fig.savefig(tmp, dpi=100)
  os.replace(tmp, out_path)
  plt.close(fig)
