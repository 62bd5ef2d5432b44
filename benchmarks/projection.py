"""The loss-aware projection: its error against the best fixed point, and its cost.

The reference for a scale group (a tensor, or one output channel) at given
``w`` and ``D`` is the best of three float64 alternations run to convergence
(``|Δα| <= 1e-13 α``): one started from the weighted mean ``Σ D|w| / Σ D``,
one from ``max|w|`` and one from the scale under test. A ratio is the
weighted error ``Σ D (w - ŵ)²`` of blaq_jax's ``ŵ`` divided by the
reference's; below 1 means blaq_jax found a better fixed point than all three.

Two measurements, printed and saved as JSON and markdown under ``--out``:

1. **Cold start** (``bq.quantize``, a transform's ``init``, export): a dense
   Gaussian kernel and a heavy-tailed conv kernel with random positive ``D``,
   at every width 2-8, linear and log, per tensor and per channel.
2. **Warm start in training**: LAQ on an MLP on scikit-learn's 8x8 digits (no
   download), ``--steps`` steps, at every width 2-8, linear and log, per
   tensor and per channel. Every ``--every`` steps, each quantized leaf's
   ``ŵ`` (``quantize_params(params, spec, state=state)``) is compared with the
   reference at the same ``w`` and ``D``; the table gives the mean and the
   worst ratio over steps and groups, and the passes over the weights the
   step's projection costs.

Usage::

  python -m benchmarks.projection [--steps 300] [--out outputs/projection]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import blaq_jax as bq

WIDTHS = tuple(range(2, 9))
SCHEMES = ("linear", "log")


# ---------------------------------------------------- the float64 reference


def nearest_code_np(x, spec):
  """Nearest code of ``spec`` to ``x`` (float64 numpy, written apart from the
  library's rounding)."""
  if spec.scheme == "log":
    depth = spec.log_depth
    mag = np.minimum(np.abs(x), 1.0)
    j = np.floor(-np.log2(np.where(mag > 0, mag, 1.0)))   # 2^-(j+1) < mag <= 2^-j
    hi, lo = 2.0 ** -j, 2.0 ** -(j + 1)
    p = np.where(hi - mag <= mag - lo, hi, lo)
    smallest = 2.0 ** -depth
    p = np.clip(p, smallest, 1.0)
    p = np.where(mag <= smallest / 2, 0.0, p)
    return np.sign(x) * p
  n = spec.levels
  return np.round(np.clip(x, -1, 1) * n) / n


def group_axes(ndim: int, per_channel: bool) -> tuple:
  return tuple(range(ndim - 1)) if per_channel else tuple(range(ndim))


def group_error(w, d, spec, alpha):
  """``Σ D (w - α code(w/α))²`` per scale group (reduced axes kept)."""
  axes = group_axes(w.ndim, spec.per_channel)
  return np.sum(d * (w - alpha * nearest_code_np(w / alpha, spec)) ** 2, axis=axes,
                keepdims=True)


def converged_alternation(w, d, spec, alpha, tol=1e-13, max_rounds=100_000):
  """The float64 alternation from ``alpha`` run to ``|Δα| <= tol α`` per group."""
  axes = group_axes(w.ndim, spec.per_channel)
  alpha = np.array(alpha, np.float64)
  for _ in range(max_rounds):
    b = nearest_code_np(w / alpha, spec)
    den = np.sum(d * b * b, axis=axes, keepdims=True)
    new = np.where(den > 0, np.sum(d * b * w, axis=axes, keepdims=True)
                   / np.where(den > 0, den, 1), alpha)
    done = np.all(np.abs(new - alpha) <= tol * np.abs(new))
    alpha = new
    if done:
      break
  return alpha


def best_fixed_point_error(w, d, spec, alpha_in_use):
  """Per group, the least error of the three converged alternations (from the
  weighted mean |w|, from max |w| and from ``alpha_in_use``)."""
  w, d = np.asarray(w, np.float64), np.asarray(d, np.float64)
  axes = group_axes(w.ndim, spec.per_channel)
  starts = (np.sum(d * np.abs(w), axis=axes, keepdims=True) / np.sum(d, axis=axes,
                                                                       keepdims=True),
            np.max(np.abs(w), axis=axes, keepdims=True),
            np.broadcast_to(np.asarray(alpha_in_use, np.float64),
                            np.max(np.abs(w), axis=axes, keepdims=True).shape))
  errs = [group_error(w, d, spec, converged_alternation(w, d, spec, s)) for s in starts]
  return np.minimum(np.minimum(errs[0], errs[1]), errs[2])


def error_ratios(w, d, spec, alpha):
  """Per group, the error of ``ŵ = α code(w/α)`` over the reference's (flat)."""
  w, d = np.asarray(w, np.float64), np.asarray(d, np.float64)
  alpha = np.asarray(alpha, np.float64)
  ref = best_fixed_point_error(w, d, spec, alpha)
  ours = group_error(w, d, spec, alpha)
  return (np.where(ref > 0, ours / np.where(ref > 0, ref, 1), 1.0)).ravel()


# ------------------------------------------------------------ measurements


def kernels(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  dense = rng.normal(size=(300, 40)) * 0.05
  conv = rng.laplace(size=(3, 3, 32, 48)) * 0.05
  return {"dense 300x40 (Gaussian)": (dense, rng.uniform(0.1, 2.0, dense.shape)),
          "conv 3x3x32x48 (Laplace)": (conv, rng.uniform(0.1, 2.0, conv.shape))}


def cold_start_table(seed: int = 0) -> list[dict]:
  out = []
  for name, (w, d) in kernels(seed).items():
    for scheme in SCHEMES:
      for per_channel in (False, True):
        for bits in WIDTHS:
          spec = bq.QuantSpec(bits, scheme=scheme, per_channel=per_channel)
          w32, d32 = jnp.asarray(w, jnp.float32), jnp.asarray(d, jnp.float32)
          alpha = bq.fit_scale(w32, spec, d32)
          r = error_ratios(w, d, spec, alpha)
          out.append({"kernel": name, "scheme": scheme, "per_channel": per_channel,
                      "bits": bits, "mean_ratio": float(r.mean()),
                      "worst_ratio": float(r.max())})
  return out


def digits_problem(seed: int = 0):
  from sklearn.datasets import load_digits
  x, y = load_digits(return_X_y=True)
  keys = jax.random.split(jax.random.key(seed), 3)
  params = {"l1": {"kernel": jax.random.normal(keys[0], (64, 256)) * 0.1,
                   "bias": jnp.zeros(256)},
            "l2": {"kernel": jax.random.normal(keys[1], (256, 256)) * 0.06,
                   "bias": jnp.zeros(256)},
            "l3": {"kernel": jax.random.normal(keys[2], (256, 10)) * 0.06,
                   "bias": jnp.zeros(10)}}

  def loss(p, xb, yb):
    h = jax.nn.relu(xb @ p["l1"]["kernel"] + p["l1"]["bias"])
    h = jax.nn.relu(h @ p["l2"]["kernel"] + p["l2"]["bias"])
    logits = h @ p["l3"]["kernel"] + p["l3"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  return params, loss, (jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y))


def warm_start_ratios(spec_kwargs: dict, steps: int, every: int, seed: int = 0,
                      lr: float = 1e-3, problem=None) -> dict:
  """LAQ training; per checked step and quantized group, the error ratio of
  the ``ŵ`` the next forward pass uses."""
  params, loss, (x, y) = problem or digits_problem(seed)
  spec = bq.quant_spec(params, **spec_kwargs)
  tx = bq.laq(lr, spec)

  @jax.jit
  def step(params, state, xb, yb):
    q = bq.quantize_params(params, spec, state=state)
    updates, state = tx.update(jax.grad(loss)(q, xb, yb), state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  rng = np.random.default_rng(seed)
  ratios, passes, sizes = [], [], []
  for s, w in zip(jax.tree.leaves(spec), jax.tree.leaves(params)):
    if s is not None:
      passes.append(bq.warm_fit_cost(w.shape, s))
      sizes.append(w.size)
  for t in range(steps):
    idx = rng.integers(0, x.shape[0], 64)
    params, state = step(params, state, x[idx], y[idx])
    if (t + 1) % every and t + 1 != steps:
      continue
    curv = bq.curvature(state)
    for s, w, d, a in zip(*(jax.tree.leaves(tr, is_leaf=lambda v: v is None)
                            for tr in (spec, params, curv, state.scale))):
      if s is not None:
        ratios.append(error_ratios(w, d, s, a))
  r = np.concatenate(ratios)
  return {"mean_ratio": float(r.mean()), "worst_ratio": float(r.max()),
          "passes_per_step": float(np.average(passes, weights=sizes))}


def warm_start_table(steps: int, every: int, seed: int = 0) -> list[dict]:
  problem = digits_problem(seed)
  out = []
  for scheme in SCHEMES:
    for per_channel in (False, True):
      for bits in WIDTHS:
        row = warm_start_ratios(dict(bits=bits, scheme=scheme, per_channel=per_channel),
                                steps, every, seed, problem=problem)
        out.append({"scheme": scheme, "per_channel": per_channel, "bits": bits,
                    "steps": steps, **row})
        print(out[-1], flush=True)
  return out


def markdown(cold: list[dict], warm: list[dict], cfg: dict) -> str:
  scale = lambda r: "per channel" if r["per_channel"] else "per tensor"
  lines = ["Cold start (`bq.fit_scale` without a warm start), random positive D: weighted "
           "error / the best of three float64 alternations run to convergence.", "",
           "| kernel | scheme | scale | bits | mean ratio | worst ratio |",
           "|---|---|---|---|---|---|"]
  for r in cold:
    lines.append(f"| {r['kernel']} | {r['scheme']} | {scale(r)} | {r['bits']} | "
                 f"{r['mean_ratio']:.5f} | {r['worst_ratio']:.5f} |")
  lines += ["", f"Warm start in LAQ training (digits MLP 64-256-256-10, batch 64, lr 1e-3, "
            f"{cfg['steps']} steps, checked every {cfg['every']}): the error of the ŵ the "
            "forward pass uses / the reference at the same w and D, over checked steps "
            "and groups; passes over the weights per projection (size-weighted).", "",
            "| scheme | scale | bits | mean ratio | worst ratio | passes per step |",
            "|---|---|---|---|---|---|"]
  for r in warm:
    lines.append(f"| {r['scheme']} | {scale(r)} | {r['bits']} | {r['mean_ratio']:.5f} | "
                 f"{r['worst_ratio']:.5f} | {r['passes_per_step']:.2f} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="outputs/projection")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--every", type=int, default=25, help="check every this many steps")
  p.add_argument("--skip-cold", action="store_true", help="only the warm-start runs")
  args = p.parse_args(argv)
  cfg = vars(args)
  report = {"config": cfg, "jax": jax.__version__,
            "cold_start": [] if args.skip_cold else cold_start_table(),
            "warm_start": warm_start_table(args.steps, args.every)}
  md = markdown(report["cold_start"], report["warm_start"], cfg)
  print(md)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "projection.json").write_text(json.dumps(report, indent=1))
  (out / "projection.md").write_text(md)
  return report


if __name__ == "__main__":
  main()
