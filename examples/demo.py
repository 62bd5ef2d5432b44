"""`make demo`: the 2-D toy, then LAQ / BLAQ / BWN-STE / full precision on digits.

    python -m examples.demo [--epochs 40] [--seeds 5] [--outdir outputs/demo]

Part 1 runs :mod:`examples.toy_2d.main` (Fig. 1 of the BLAQ paper). Part 2
trains a small Flax NNX MLP (64-128-128-10, batch norm, all three dense
kernels at 1 bit, biases and batch norm in full precision) on scikit-learn's
8x8 digits (1797 images shipped inside scikit-learn, no download; a fixed
stratified 80/20 split), with

* FP:      full precision, Adam;
* BWN-STE: ``ŵ = mean|w| · sign(w)``, straight-through gradient, latent
  weights trained by Adam and clipped to [-1, 1] (``bq.ste``);
* LAQ:     ``bq.laq``;
* BLAQ:    ``bq.blaq(a=0.6)``;

all with the same learning-rate schedule, batch size and epochs. It prints a
table (test accuracy with the quantized weights, mean ± std over seeds; code
flips of the 1-bit weights from ``bq.track_oscillations``; seconds) and writes
``digits.png`` (test accuracy, training loss and flips per epoch) next to the toy's
``toy_2d.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import blaq_jax as bq
from examples import methods as methods_lib
from examples import statistics

METHODS = ("fp", "bwn-ste", "laq", "blaq")   # names of examples/methods.py


class MLP(nnx.Module):
  """Dense-BN-ReLU blocks and a dense head."""

  def __init__(self, sizes=(64, 128, 128, 10), *, rngs: nnx.Rngs):
    self.dense = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-2], sizes[1:-1])])
    self.norm = nnx.List([nnx.BatchNorm(b, momentum=0.9, rngs=rngs) for b in sizes[1:-1]])
    self.head = nnx.Linear(sizes[-2], sizes[-1], rngs=rngs)

  def __call__(self, x, train: bool = False):
    for dense, norm in zip(self.dense, self.norm):
      x = jax.nn.relu(norm(dense(x), use_running_average=not train))
    return self.head(x)


def load_digits_split(seed: int = 0, test_fraction: float = 0.2):
  """scikit-learn's digits as float32 in [0, 1]; a fixed stratified split."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  data = load_digits()
  x = (data.data / 16.0).astype(np.float32)
  y = data.target.astype(np.int32)
  return train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)


class Trainer:
  """One method's jitted training epoch with evaluation (compiled once, reused
  for every seed)."""

  def __init__(self, method: str, *, epochs: int, steps_per_epoch: int, lr: float):
    self.method = method = methods_lib.get(method)
    self.graphdef, params, _ = nnx.split(MLP(rngs=nnx.Rngs(0)), nnx.Param, ...)
    self.spec = spec = bq.quant_spec(params, bits=1)
    schedule = optax.cosine_decay_schedule(lr, epochs * steps_per_epoch)
    options = methods_lib.Options(a=0.6, steps_per_epoch=steps_per_epoch)
    self.tx = tx = optax.chain(method.optimizer(schedule, spec, options),
                               bq.track_oscillations(spec, window=steps_per_epoch))
    graphdef = self.graphdef

    def loss_fn(p, rest, x, y):
      m = nnx.merge(graphdef, p, rest, copy=True)
      logits = m(x, train=True)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, nnx.state(m, nnx.BatchStat)

    def step(carry, batch):
      params, rest, opt_state = carry
      x, y = batch
      updates, opt_state, loss, new_rest = method.step(
          tx, spec, params, opt_state, lambda p: loss_fn(p, rest, x, y), options=options)
      return (optax.apply_updates(params, updates), new_rest, opt_state), loss

    @jax.jit
    def epoch(params, rest, opt_state, x, y, x_test, y_test):
      """Trains on the epoch's batches ``x``, ``y`` (steps, batch, ...) and
      evaluates the quantized model on the test set (one compiled function)."""
      (params, rest, opt_state), losses = jax.lax.scan(
          step, (params, rest, opt_state), (x, y))
      m = nnx.merge(graphdef, method.weights(params, spec, opt_state), rest, copy=True)
      acc = jnp.mean(jnp.argmax(m(x_test, train=False), -1) == y_test)
      return params, rest, opt_state, jnp.mean(losses), acc, bq.oscillation_stats(opt_state)

    self.epoch = epoch

  def train(self, seed: int, data, *, epochs: int, batch_size: int):
    """Trains from seed ``seed``; returns per-epoch curves, accuracy and flips."""
    x_train, x_test, y_train, y_test = data
    _, params, rest = nnx.split(MLP(rngs=nnx.Rngs(seed)), nnx.Param, ...)
    opt_state = self.tx.init(params)
    steps = len(x_train) // batch_size
    rng = np.random.default_rng(seed)
    curves = {"loss": [], "acc": [], "flips": []}
    for _ in range(epochs):
      idx = rng.permutation(len(x_train))[:steps * batch_size].reshape(steps, batch_size)
      params, rest, opt_state, loss, acc, stats = self.epoch(
          params, rest, opt_state, x_train[idx], y_train[idx], x_test, y_test)
      curves["loss"].append(float(loss))
      curves["acc"].append(float(acc))
      curves["flips"].append(float(stats["all/window_flips"]))
    return {"curves": curves, "acc": curves["acc"][-1], "flips_total": float(stats["all/flips"])}


def run_digits(*, epochs: int, seeds: int, batch_size: int, lr: float, train_limit=None,
               methods=METHODS):
  data = load_digits_split()
  if train_limit is not None:
    data = (data[0][:train_limit], data[1], data[2][:train_limit], data[3])
  results = {}
  for method in methods:
    t0 = time.perf_counter()
    trainer = Trainer(method, epochs=epochs, steps_per_epoch=len(data[0]) // batch_size, lr=lr)
    runs = [trainer.train(seed, data, epochs=epochs, batch_size=batch_size)
            for seed in range(seeds)]
    results[methods_lib.get(method).label] = {"runs": runs, "seconds": time.perf_counter() - t0}
  return data, results


def format_table(results, *, epochs: int, seeds: int, train_size: int, test_size: int) -> str:
  lines = [
      f"Digits 8x8 (train {train_size}, test {test_size}), MLP 64-128-128-10 with BN, "
      f"1-bit kernels, {epochs} epochs, {seeds} seed(s)",
      "| method | test accuracy (%) | flips, last 10 epochs | flips, total | seconds |",
      "|---|---|---|---|---|",
  ]
  for method, res in results.items():
    acc = 100 * np.array([r["acc"] for r in res["runs"]])
    last = np.mean([np.sum(r["curves"]["flips"][-10:]) for r in res["runs"]])
    total = np.mean([r["flips_total"] for r in res["runs"]])
    lines.append(f"| {method} | {acc.mean():.2f} ± {acc.std():.2f} | {last:.0f} | "
                 f"{total:.0f} | {res['seconds']:.1f} |")
  lines.append("(flips: code changes of sign(w) of the kernels, mean over seeds; for FP "
               "the sign of its full-precision weights; seconds include compilation)")
  lines += paired_lines(results, test_size)
  return "\n".join(lines)


def paired_lines(results, test_size: int, reference: str = "LAQ") -> list[str]:
  """Each method's accuracy minus ``reference``'s, seed by seed, with the 95%
  t-interval of the mean: what a difference in the table is worth. XLA's CPU
  kernels round differently on different CPUs, so single digits move between
  machines; an interval that holds 0 is no difference."""
  if reference not in results or len(results[reference]["runs"]) < 2:
    return []
  ref = 100 * np.array([r["acc"] for r in results[reference]["runs"]])
  lines = [f"Paired differences against {reference} (points; one test image is "
           f"{100 / test_size:.2f}), 95% t-interval over seeds:"]
  for method, res in results.items():
    if method == reference:
      continue
    diffs = 100 * np.array([r["acc"] for r in res["runs"]]) - ref
    mean, low, high = statistics.t_interval(diffs)
    verdict = "not resolved" if low <= 0 <= high else ("higher" if low > 0 else "lower")
    lines.append(f"  {method} - {reference}: {mean:+.2f} [{low:+.2f}, {high:+.2f}] ({verdict})")
  return lines


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4))
  for method, res in results.items():
    acc = np.mean([r["curves"]["acc"] for r in res["runs"]], axis=0)
    loss = np.mean([r["curves"]["loss"] for r in res["runs"]], axis=0)
    flips = np.mean([r["curves"]["flips"] for r in res["runs"]], axis=0)
    epochs = np.arange(1, len(acc) + 1)
    ax1.plot(epochs, 100 * acc, label=method)
    ax2.plot(epochs, loss, label=method)
    ax3.plot(epochs, flips, label=method)
  ax1.set_xlabel("epoch")
  ax1.set_ylabel("test accuracy (%)")
  ax1.set_title("digits, 1-bit weights (mean over seeds)")
  ax2.set_xlabel("epoch")
  ax2.set_ylabel("training loss (at ŵ)")
  ax2.set_yscale("log")
  ax3.set_xlabel("epoch")
  ax3.set_ylabel("sign flips of the kernels per epoch")
  ax3.set_yscale("symlog", linthresh=1)
  for ax in (ax1, ax2, ax3):
    ax.legend()
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--epochs", type=int, default=40)
  p.add_argument("--seeds", type=int, default=5)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--lr", type=float, default=0.01)
  p.add_argument("--train-limit", type=int, default=None,
                 help="use only the first N training images (for quick runs)")
  p.add_argument("--toy-steps", type=int, default=2000)
  p.add_argument("--outdir", default="outputs/demo")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from examples.toy_2d import main as toy_main

  t0 = time.perf_counter()
  print("== Part 1: the 2-D toy of Fig. 1 ==")
  toy = toy_main.main(["--steps", str(args.toy_steps), "--outdir", args.outdir])
  print("\n== Part 2: scikit-learn digits ==")
  data, results = run_digits(epochs=args.epochs, seeds=args.seeds, batch_size=args.batch_size,
                             lr=args.lr, train_limit=args.train_limit)
  print(format_table(results, epochs=args.epochs, seeds=args.seeds,
                     train_size=len(data[0]), test_size=len(data[1])))
  os.makedirs(args.outdir, exist_ok=True)
  path = os.path.join(args.outdir, "digits.png")
  plot(results, path)
  print(f"wrote {path}")
  print(f"demo finished in {time.perf_counter() - t0:.0f} s")
  return {"toy": toy, "digits": results}


if __name__ == "__main__":
  main()
