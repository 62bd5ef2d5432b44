"""The loss-aware Adam step shared by LAQ, BLAQ and the variants in contrib.

Adam's moments, its denominator ``D`` (the diagonal curvature of the
loss-aware projection) and the clipped step of the latent weights. Kept in one
place so that BLAQ with ``a = 1`` runs exactly LAQ's operations.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import tree_utils as otu

from blaq_jax._src import checks
from blaq_jax._src import spec as spec_lib
from blaq_jax._src import tree as tree_lib
from blaq_jax._src.quantizers import initial_scale


class Hyper(NamedTuple):
  """Adam's constants and the clip of the latent weights."""
  b1: Any
  b2: Any
  eps: Any
  clip: Any


def check_hyperparams(where: str, b1, b2, eps, clip, **extra) -> None:
  """Type and range checks of Adam's constants, the clip and ``extra`` (each
  a number in [0, 1]); see :mod:`blaq_jax._src.checks` for traced values."""
  checks.adam(where, b1, b2, eps, clip)
  for name, val in extra.items():
    checks.number(where, name, val, lo=0, hi=1)


def learning_rate_at(learning_rate, count):
  return learning_rate(count) if callable(learning_rate) else learning_rate


def init_state(state_cls, params, spec, where: str, **extra):
  """``state_cls(count, mu, nu, [curvature,] scale, skipped, **extra)`` at step 0.

  ``mu``, ``nu`` are zeros; ``curvature`` (where the state has that field)
  holds ``D = 1`` and ``scale`` the cold-started scale of the plain
  projection (``D = 1``, as before the first step) for quantized leaves only
  (None elsewhere); ``count`` and ``skipped`` are distinct buffers, so the
  state can be donated.
  """
  tree_lib.check_float_params(params, where)
  spec_lib.check_spec_matches(spec, params, where)
  scale = spec_lib.map_with_spec(
      lambda s, w: None if s is None else initial_scale(w, s), spec, params)
  if "curvature" in state_cls._fields:
    extra["curvature"] = spec_lib.map_with_spec(
        lambda s, w: None if s is None else jnp.ones_like(w), spec, params)
  return state_cls(count=jnp.zeros([], jnp.int32), mu=otu.tree_zeros_like(params),
                   nu=otu.tree_zeros_like(params), scale=scale,
                   skipped=jnp.zeros([], jnp.int32), **extra)


def moment(old, g, decay):
  """EMA ``decay old + (1-decay) g``, written ``old + (1-decay)(g - old)``.

  This form has a single multiply-add, so the compiler's FMA contraction of it
  does not depend on the surrounding graph: LAQ and BLAQ get the same bits.
  """
  return jax.tree.map(lambda o, x: (o + (1 - decay) * (x - o)).astype(o.dtype), old, g)


def second_moment(old, g, decay):
  return jax.tree.map(lambda o, x: (o + (1 - decay) * (x * x - o)).astype(o.dtype), old, g)


def second_moment_instead(nu1, g_old, g_new, decay):
  """``second_moment(nu, g_new, decay)`` from ``nu1 = second_moment(nu, g_old,
  decay)`` without reading ``nu``: ``nu1 + (1-decay)(g_new² - g_old²)``
  (equal up to rounding)."""
  return jax.tree.map(lambda n1, x, y: (n1 + (1 - decay) * (y * y - x * x)).astype(n1.dtype),
                      nu1, g_old, g_new)


def as_float(x):
  """``x`` as a scalar array of the default float type (float64 under x64)."""
  return jnp.asarray(x, jnp.result_type(float))


def denominator(nu, count, b2, eps):
  """``D = sqrt(nu / (1 - b2^count)) + eps`` (Adam's bias-corrected scale)."""
  # b2 as an array of the default float type, as LAQState stores it, so that
  # curvature(state) recomputes the very D the update used.
  bc = 1 - as_float(b2) ** count
  # count 0 (a first step skipped): nu = 0, D = eps. XLA may rewrite a
  # division by a scalar as a multiplication by its reciprocal in one graph
  # and not in another; written as the multiplication, with the scalar
  # behind a barrier, every graph computes the same D.
  inv = jax.lax.optimization_barrier(1 / jnp.where(bc > 0, bc, 1))
  return tree_lib.map_none(lambda v: jnp.sqrt(v * inv.astype(v.dtype)) + eps, nu)


def step_latent(spec, params, mu, den, count, lr, b1, clip):
  """``w - lr * (mu / (1 - b1^count)) / den``, clipped to ``[-clip, clip]`` for
  quantized leaves; returns the new params."""
  # As in denominator: one form in every graph (LAQ and BLAQ with a = 1
  # must get the same bits).
  inv = jax.lax.optimization_barrier(1 / (1 - b1 ** count))

  def fn(s, w, m, d):
    new = w - lr * (m * inv.astype(m.dtype)) / d
    if s is not None and clip is not None:
      new = jnp.clip(new, -clip, clip)
    return new.astype(w.dtype)

  return spec_lib.map_with_spec(fn, spec, params, mu, den)


def quantized_curvature(spec, den):
  """Keeps ``den`` for quantized leaves, None elsewhere."""
  return spec_lib.map_with_spec(lambda s, d: None if s is None else d, spec, den)


def mix(a, x, y):
  """``a x + (1 - a) y`` leafwise (exactly ``x`` when ``a = 1``)."""
  return jax.tree.map(lambda u, v: a * u + (1 - a) * v, x, y)


def updates_from(new_params, params):
  return jax.tree.map(lambda n, w: n - w, new_params, params)


def as_applied(new_params, params):
  """The params the caller gets: ``optax.apply_updates(params, updates_from(
  new_params, params))``, which can differ from ``new_params`` by a rounding.
  The scales are fitted to these, so that ``ŵ`` is the projection of the
  caller's weights, and XLA computes this expression once for both."""
  return optax.apply_updates(params, updates_from(new_params, params))


def fit_inputs(spec, applied, nu, count, hyper: Hyper):
  """``(applied, D)`` as the scale's fit reads them after a step.

  ``D`` is recomputed from the new second moment ``nu`` for quantized leaves
  (None elsewhere), with ``applied`` and ``nu`` behind an optimization
  barrier: so the fit reads the two buffers the step writes anyway (the new
  params and moment) and takes ``sqrt`` inside its own reductions, where
  XLA would otherwise keep the step's ``D`` as a temporary the size of the
  weights, written once and read again (on XLA:CPU, a 1-bit LAQ update of
  the MNIST MLP took 41 ms that way and 27 ms this way, Adam 18 ms). Every
  graph computes ``D`` with :func:`denominator`'s operations, so the values
  are those of the step's ``D``.
  """
  applied, nu = jax.lax.optimization_barrier((applied, nu))
  return applied, quantized_curvature(spec, denominator(nu, count, hyper.b2, hyper.eps))


def check_not_masked(params, where: str) -> None:
  leaves = jax.tree.leaves(params, is_leaf=tree_lib.is_masked)
  if any(tree_lib.is_masked(l) for l in leaves):
    raise ValueError(
        f"{where}: got params with optax.MaskedNode leaves; the lookahead gradient "
        "needs the whole model, so do not wrap this transform in optax.masked / "
        "multi_transform (leaves with spec None already take the full-precision step)")


