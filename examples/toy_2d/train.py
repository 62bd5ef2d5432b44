"""Runs LAQ, BLAQ and full-precision Adam on the toy losses and measures them.

The weights are one small vector quantized to 1 bit per tensor, so
``ŵ = alpha · sign(w)`` with ``alpha = sum(D |w|) / sum(D)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

import blaq_jax as bq
from examples import methods

METHODS = ("fp", "laq", "blaq")   # names of examples/methods.py


def quadratic(w):
  """The loss of Fig. 1: ``5 (w1 - 0.054)^2 + (w2 + 0.055)^2``."""
  return 5 * (w[0] - 0.054) ** 2 + (w[1] + 0.055) ** 2


def power_three_halves(w, c=1.0):
  """``c · sum |w_i|^{3/2}`` (with one weight: the paper's ``c |w|^{3/2}``)."""
  return c * jnp.sum(jnp.abs(w) ** 1.5)


LOSSES = {"quadratic": quadratic, "power_1.5": power_three_halves}


@dataclasses.dataclass
class Trajectory:
  method: str
  latent: np.ndarray      # (steps + 1, n): w_t, starting at w_0
  quantized: np.ndarray   # (steps + 1, n): ŵ_t (= w_t for "fp")
  loss: np.ndarray        # (steps + 1,): loss at ŵ_t
  window_flips: float     # code flips over the last `window` steps (track_oscillations)
  window: int


def run(method: str, loss_name: str, w0, *, lr: float, steps: int, a: float = 0.6,
        window: int = 100) -> Trajectory:
  """Trains ``w`` from ``w0`` for ``steps`` steps; returns the whole trajectory."""
  if method not in METHODS:
    raise ValueError(f"run: method must be one of {METHODS}, got {method!r}")
  name, method = method, methods.get(method)
  loss_fn = LOSSES[loss_name]
  params = {"w": jnp.asarray(w0, jnp.float32)}
  spec = {"w": bq.QuantSpec(1)}
  window = min(window, steps)
  tx = optax.chain(method.optimizer(lr, spec, methods.Options(a=a)),
                   bq.track_oscillations(spec, window=window))
  loss = lambda p: loss_fn(p["w"])
  forward = lambda p, state: method.weights(p, spec, state)

  def step(carry, _):
    p, state = carry
    updates, state, _, _ = method.step(tx, spec, p, state, lambda w: (loss(w), None))
    p = optax.apply_updates(p, updates)
    q = forward(p, state)
    return (p, state), (p["w"], q["w"], loss(q))

  @jax.jit
  def train(params):
    state = tx.init(params)
    q0 = forward(params, state)
    (_, state), (ws, qs, ls) = jax.lax.scan(step, (params, state), None, length=steps)
    stats = bq.oscillation_stats(state)
    cat = lambda x0, xs: jnp.concatenate([x0[None], xs])
    return (cat(params["w"], ws), cat(q0["w"], qs), cat(loss(q0), ls),
            stats["all/window_flips"])

  ws, qs, ls, flips = jax.device_get(train(params))
  # The tracker's windows tumble; its last completed window is the last
  # `window` steps only when `steps` is a multiple of `window`.
  if steps % window:
    flips = count_flips(qs[-window - 1:])
  return Trajectory(name, ws, qs, ls, float(flips), window)


def count_flips(quantized: np.ndarray) -> int:
  """Sign changes of the quantized weights between successive steps."""
  signs = np.asarray(quantized) >= 0
  return int(np.sum(signs[1:] != signs[:-1]))


def steps_to_settle(quantized: np.ndarray, rtol: float = 0.01):
  """First step ``t`` with ``|ŵ_s - ŵ_T| <= rtol |ŵ_T|`` for all ``s >= t``.

  Returns None when the trajectory only meets this at its last step (it has
  not settled).
  """
  q = np.asarray(quantized, np.float64)
  final = q[-1]
  tol = rtol * max(np.linalg.norm(final), 1e-12)
  far = np.linalg.norm(q - final, axis=1) > tol
  idx = np.nonzero(far)[0]
  t = 0 if idx.size == 0 else int(idx[-1]) + 1
  return None if t >= len(q) - 1 else t
