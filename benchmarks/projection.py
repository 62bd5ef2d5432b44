"""The loss-aware projection: how close to its fixed point, and at what cost.

Two measurements, printed and saved as JSON and markdown under ``--out``:

1. **Cold start.** On a Gaussian kernel with random positive ``D`` (``--rows``
   x ``--cols``), the weighted error ``Σ D (w - ŵ)²`` of ``bq.quantize`` (float32)
   divided by that of the alternation run to convergence in float64 numpy from
   ``α = Σ D|w| / Σ D`` (what a fixed number of rounds from that start
   approaches), at every width and scheme, per tensor and per channel; and the
   number of alternation rounds ``bq.quantize`` ran after its grid.
2. **Warm start in training.** LAQ on an MLP on scikit-learn's 8x8 digits (no
   download), ``--steps`` steps at 2, 4 and 8 bits: the mean (and max) number of
   alternation rounds per step and per quantized leaf of the warm-started
   projection that the update runs.

Usage::

  python -m benchmarks.projection [--out outputs/projection]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import blaq_jax as bq


def converged_error(w, d, spec, axes, alpha, tol=1e-13, max_rounds=100_000):
  """Weighted error of the float64 alternation run to convergence from ``alpha``."""
  book = spec.codebook()

  def codes(alpha):
    return book[np.abs((w / alpha)[..., None] - book).argmin(-1)]

  rounds = 0
  for rounds in range(1, max_rounds + 1):
    b = codes(alpha)
    new = (np.sum(d * b * w, axis=axes, keepdims=True)
           / np.sum(d * b * b, axis=axes, keepdims=True))
    done = np.all(np.abs(new - alpha) <= tol * new)
    alpha = new
    if done:
      break
  return float(np.sum(d * (w - alpha * codes(alpha)) ** 2)), rounds


def rounds_of(w, spec, d, scale):
  _, r = jax.jit(lambda w, d: bq.fit_scale(w, spec, d, scale, with_rounds=True))(w, d)
  return int(r)


def cold_start_table(rows: int, cols: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(rows, cols)) * 0.05
  d = rng.uniform(0.1, 2.0, size=w.shape)
  out = []
  for scheme in ("linear", "log"):
    for per_channel in (False, True):
      for bits in range(2, 9):
        spec = bq.QuantSpec(bits, scheme, per_channel=per_channel)
        axes = (0,) if per_channel else (0, 1)
        start = (np.sum(d * np.abs(w), axis=axes, keepdims=True)
                 / np.sum(d, axis=axes, keepdims=True))
        ref, ref_rounds = converged_error(w, d, spec, axes, start)
        w32, d32 = jnp.asarray(w, jnp.float32), jnp.asarray(d, jnp.float32)
        q = np.asarray(bq.quantize(w32, spec, d32), np.float64)
        err = float(np.sum(d * (w - q) ** 2))
        out.append({"scheme": scheme, "per_channel": per_channel, "bits": bits,
                    "ratio": err / ref, "reference_rounds": ref_rounds,
                    "rounds_after_grid": rounds_of(w32, spec, d32, None)})
  return out


def warm_start_rounds(steps: int, seed: int = 0, tol: float = 1e-6) -> list[dict]:
  from sklearn.datasets import load_digits
  x, y = load_digits(return_X_y=True)
  x = jnp.asarray(x / 16.0, jnp.float32)
  y = jnp.asarray(y)
  out = []
  for bits in (2, 4, 8):
    keys = jax.random.split(jax.random.key(seed), 3)
    params = {"l1": {"kernel": jax.random.normal(keys[0], (64, 256)) * 0.1,
                     "bias": jnp.zeros(256)},
              "l2": {"kernel": jax.random.normal(keys[1], (256, 256)) * 0.06,
                     "bias": jnp.zeros(256)},
              "l3": {"kernel": jax.random.normal(keys[2], (256, 10)) * 0.06,
                     "bias": jnp.zeros(10)}}
    spec = bq.quant_spec(params, bits=bits, tol=tol)
    tx = bq.laq(1e-3, spec)

    def loss(p, xb, yb):
      h = jax.nn.relu(xb @ p["l1"]["kernel"] + p["l1"]["bias"])
      h = jax.nn.relu(h @ p["l2"]["kernel"] + p["l2"]["bias"])
      logits = h @ p["l3"]["kernel"] + p["l3"]["bias"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def step(params, state, xb, yb):
      q = bq.quantize_params(params, spec, state=state)
      updates, new_state = tx.update(jax.grad(loss)(q, xb, yb), state, params)
      new_params = optax.apply_updates(params, updates)
      # The rounds the update's warm-started projection ran, per quantized leaf,
      # and its weighted error against the alternation continued to tol 0.
      rounds, excess = [], []
      for w, s, d, a in zip(*(jax.tree.leaves(t, is_leaf=lambda v: v is None) for t in (
          new_params, spec, new_state.curvature, state.scale))):
        if s is None:
          continue
        alpha, r = bq.fit_scale(w, s, d, a, with_rounds=True)
        tight = dataclasses.replace(s, tol=0.0, max_iters=500)
        err = lambda al: jnp.sum(d * (w - bq.quantize_with_scale(w, s, al)) ** 2)
        rounds.append(r)
        excess.append(err(alpha) / err(bq.fit_scale(w, tight, d, alpha)) - 1)
      return new_params, new_state, jnp.stack(rounds), jnp.stack(excess)

    state = tx.init(params)
    rng = np.random.default_rng(seed)
    per_step, excess = [], []
    for _ in range(steps):
      idx = rng.integers(0, x.shape[0], 64)
      params, state, r, e = step(params, state, x[idx], y[idx])
      per_step.append(np.asarray(r))
      excess.append(np.asarray(e))
    per_step, excess = np.stack(per_step), np.stack(excess)
    out.append({"bits": bits, "steps": steps, "mean_rounds": float(per_step.mean()),
                "max_rounds": int(per_step.max()),
                "mean_rounds_last_half": float(per_step[steps // 2:].mean()),
                "max_excess_error": float(excess.max())})
  return out


def markdown(cold: list[dict], warm: list[dict], cfg: dict) -> str:
  lines = [f"Cold start on a {cfg['rows']}x{cfg['cols']} Gaussian kernel, random positive D: "
           "weighted error of bq.quantize (float32) / float64 alternation run to convergence "
           "from sum(D|w|)/sum(D).", "",
           "| scheme | scale | bits | error ratio | reference rounds | rounds after the grid |",
           "|---|---|---|---|---|---|"]
  for r in cold:
    lines.append(f"| {r['scheme']} | {'per channel' if r['per_channel'] else 'per tensor'} | "
                 f"{r['bits']} | {r['ratio']:.4f} | {r['reference_rounds']} | "
                 f"{r['rounds_after_grid']} |")
  lines += ["", "Warm start in LAQ training (digits MLP 64-256-256-10, batch 64, lr 1e-3, "
            f"tol {cfg['tol']:g}): alternation rounds per step and quantized leaf.", "",
            "| bits | steps | mean rounds | mean rounds, 2nd half | max rounds "
            "| max excess error over full convergence |", "|---|---|---|---|---|---|"]
  for r in warm:
    lines.append(f"| {r['bits']} | {r['steps']} | {r['mean_rounds']:.2f} | "
                 f"{r['mean_rounds_last_half']:.2f} | {r['max_rounds']} | "
                f"{r['max_excess_error']:.1e} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="outputs/projection")
  p.add_argument("--rows", type=int, default=300)
  p.add_argument("--cols", type=int, default=40)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--tol", type=float, default=bq.QuantSpec(2).tol,
                 help="QuantSpec.tol of the training runs")
  p.add_argument("--skip-cold", action="store_true", help="only the warm-start runs")
  args = p.parse_args(argv)
  cfg = vars(args)
  report = {"config": cfg, "jax": jax.__version__,
            "cold_start": [] if args.skip_cold else cold_start_table(args.rows, args.cols),
            "warm_start": warm_start_rounds(args.steps, tol=args.tol)}
  md = markdown(report["cold_start"], report["warm_start"], cfg)
  print(md)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "projection.json").write_text(json.dumps(report, indent=1))
  (out / "projection.md").write_text(md)
  return report


if __name__ == "__main__":
  main()
