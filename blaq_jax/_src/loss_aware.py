"""Adam-moment arithmetic shared by the LAQ and BLAQ transforms.

Kept in one place so that BLAQ with ``a = 1`` runs exactly LAQ's operations.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import tree_utils as otu

from blaq_jax._src import checks
from blaq_jax._src import spec as spec_lib
from blaq_jax._src import tree as tree_lib
from blaq_jax._src.quantizers import compute_dtype, fit_scale, quantize_with_scale, scale_shape


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


def initial_scale(w, spec):
  """The cold-started plain scale; zeros of its shape for abstract params
  (``jax.ShapeDtypeStruct`` leaves, e.g. a restore target): a scale <= 0 is
  replaced by a cold start at the next update."""
  if tree_lib.is_abstract(w):
    return jnp.zeros(scale_shape(w.shape, spec), compute_dtype(w.dtype))
  return fit_scale(w, spec)


def next_scales(spec, params, den, scale):
  """Per quantized leaf, the converged scale of ``Q_den(params)``, warm-started
  from ``scale`` (the previous step's); None elsewhere."""
  return spec_lib.map_with_spec(
      lambda s, w, d, a: None if s is None else fit_scale(w, s, d, a),
      spec, params, den, scale)


def project(spec, params, scale):
  """``ŵ``: ``alpha · code(w / alpha)`` per quantized leaf, ``w`` elsewhere."""
  return spec_lib.map_with_spec(
      lambda s, w, a: w if s is None else quantize_with_scale(w, s, a), spec, params, scale)


def moment(old, g, decay):
  """EMA ``decay old + (1-decay) g``, written ``old + (1-decay)(g - old)``.

  This form has a single multiply-add, so the compiler's FMA contraction of it
  does not depend on the surrounding graph: LAQ and BLAQ get the same bits.
  """
  return jax.tree.map(lambda o, x: (o + (1 - decay) * (x - o)).astype(o.dtype), old, g)


def second_moment(old, g, decay):
  return jax.tree.map(lambda o, x: (o + (1 - decay) * (x * x - o)).astype(o.dtype), old, g)


def as_float(x):
  """``x`` as a scalar array of the default float type (float64 under x64)."""
  return jnp.asarray(x, jnp.result_type(float))


def denominator(nu, count, b2, eps):
  """``D = sqrt(nu / (1 - b2^count)) + eps`` (Adam's bias-corrected scale)."""
  # b2 as an array of the default float type, as LAQState stores it, so that
  # curvature(state) recomputes the very D the update used.
  bc = 1 - as_float(b2) ** count
  bc = jnp.where(bc > 0, bc, 1)  # count 0 (a first step skipped): nu = 0, D = eps
  return tree_lib.map_none(lambda v: jnp.sqrt(v / bc.astype(v.dtype)) + eps, nu)


def step_latent(spec, params, mu, den, count, lr, b1, clip):
  """``w - lr * (mu / (1 - b1^count)) / den``, clipped to ``[-clip, clip]`` for
  quantized leaves; returns the new params."""
  bc = 1 - b1 ** count

  def fn(s, w, m, d):
    new = w - lr * (m / bc.astype(m.dtype)) / d
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


def all_finite(*trees):
  """Whether every leaf is finite, as one sum per leaf: ``sum(0 * g)`` is 0
  when all of ``g`` is finite and NaN otherwise (``0 * inf`` is NaN), and a
  plain sum is a cheaper pass than ``isfinite`` and an ``all``-reduction."""
  leaves = [l for t in trees for l in jax.tree.leaves(t)]
  if not leaves:
    return jnp.array(True)
  sums = [jnp.sum(l.astype(jnp.float32) * 0) for l in leaves]
  return jnp.isfinite(functools.reduce(jnp.add, sums))


def updates_from(new_params, params):
  return jax.tree.map(lambda n, w: n - w, new_params, params)


def check_not_masked(params, where: str) -> None:
  leaves = jax.tree.leaves(params, is_leaf=tree_lib.is_masked)
  if any(tree_lib.is_masked(l) for l in leaves):
    raise ValueError(
        f"{where}: got params with optax.MaskedNode leaves; the lookahead gradient "
        "needs the whole model, so do not wrap this transform in optax.masked / "
        "multi_transform (leaves with spec None already take the full-precision step)")


def select(ok, new, old):
  """Leafwise ``where(ok, new, old)`` with a scalar ``ok`` (``new`` if ok is None).

  Inside the elementwise update XLA fuses it into the same loop, so skipping
  a step costs no extra pass over the weights (a ``lax.cond`` around the
  update would cut that fusion), and a skipped step keeps ``old`` exactly.
  """
  if ok is None:
    return new
  return tree_lib.map_none(lambda n, o: jnp.where(ok, n, o), new, old)


def counted(ok, count, skipped):
  """``(count, skipped)`` after a step that is applied if ``ok`` (None: always)."""
  if ok is None:
    return optax.safe_increment(count), skipped
  return count + ok.astype(count.dtype), skipped + (~ok).astype(skipped.dtype)


def step_ok(g, lr, skip_nonfinite: bool):
  """Whether a step may be applied: a finite gradient and a finite, non-negative
  learning rate (a scalar check, fused into the update); None when off."""
  if not skip_nonfinite:
    return None
  lr = jnp.asarray(lr)
  return all_finite(g) & jnp.isfinite(lr) & (lr >= 0)


def latent_check_needed(hyper: Hyper) -> bool:
  """Whether new latent weights can be non-finite though the gradient, the
  learning rate and the old weights are finite: only if ``eps`` may be 0.
  With ``eps > 0``, ``D >= eps`` and Adam's ``m̂ / D`` stays bounded (a
  gradient whose square overflows makes ``D`` infinite and the step 0)."""
  return not (checks.is_concrete_number(hyper.eps) and hyper.eps > 0)


def skip_if_nonfinite(ok, new_params, params, new_state, state, spec, needed=True):
  """A step whose new latent weights are not finite is skipped and counted.

  ``new_state`` is the state after a step that applied ``ok`` (None: the
  check is off, nothing changes; ``needed`` False, see
  :func:`latent_check_needed`: nothing to check). If ``new_params`` hold a
  NaN or inf (``eps = 0`` with a zero second moment), the params and the
  state keep their old values and ``skipped`` grows by 1, as for a
  non-finite gradient. The check waits for the step's scales and then
  selects every buffer again, about a third of a LAQ update's cost on
  XLA:CPU, which is why it runs only when it can fire. A quantized leaf is
  checked through its new scale, whose sums run over all its weights (a
  non-finite weight makes it non-finite); other leaves are checked
  directly. A stored ``curvature`` is left as the step computed it: no
  update reads it back, and selecting it again would change how XLA
  fuses the scale fit that consumes it (BLAQ with ``a = 1`` would no longer
  match LAQ bit for bit). Returns ``(new_params, new_state)``.
  """
  if ok is None or not needed:
    return new_params, new_state
  witnesses = spec_lib.map_with_spec(lambda s, w, a: w if s is None else a,
                                     spec, new_params, new_state.scale)
  fine = all_finite(witnesses)
  kept = state._replace(skipped=state.skipped + 1)  # one skip, whatever ok was
  merged = {f: n if f == "curvature" else select(fine, n, o)
            for f, n, o in zip(state._fields, new_state, kept)}
  return select(fine, new_params, params), type(state)(**merged)
