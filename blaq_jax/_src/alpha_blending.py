"""Alpha-blending: move from full precision to quantized weights gradually.

The forward pass uses, for every quantized leaf,

    w_AB = (1 - α) · w + α · sg(Q(w))

with ``Q`` the plain STE quantizer (see :func:`blaq_jax.ste_quantize`) and
``sg`` a stop-gradient, so ``∂w_AB/∂w = (1 - α)``: the gradient reaches ``w``
through the full-precision term only and no straight-through estimate is
needed. ``α`` rises from 0 (full precision) to 1 (fully quantized) on a
schedule; Liu & Mattina use ``α(t) = 1 - ((T1 - t) / (T1 - T0))^3`` between
steps ``T0`` and ``T1`` (:func:`alpha_blending_schedule`). Any optax optimizer
trains ``w``::

    alpha = bq.alpha_blending_schedule(0, 2000)
    grads = jax.grad(lambda p: loss(bq.alpha_blend_params(p, spec, alpha(step))))(params)

At ``α = 1`` the forward pass uses exactly ``Q(w)`` (for ``scale="fit"`` the
same values as ``quantize_params(params, spec)``) and the gradient of the
quantized leaves vanishes: they stop moving while the other leaves (biases,
norms) can still be trained.

References:
  Liu & Mattina, `Learning low-precision neural networks without Straight-Through
  Estimator (STE) <https://arxiv.org/abs/1903.01061>`_, IJCAI 2019.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from blaq_jax._src import checks
from blaq_jax._src import spec as spec_lib
from blaq_jax._src.quantizers import check_scale, plain_quantize
from blaq_jax._src.spec import QuantSpecTree


def alpha_blend_params(params, spec: QuantSpecTree, alpha, *, scale: str = "fit"):
  """Returns ``(1 - α) w + α sg(Q(w))`` for quantized leaves, ``w`` elsewhere.

  Per quantized leaf, with ``Q`` the plain projection and ``sg`` a
  stop-gradient::

      w_AB = (1 - α) · w + α · sg(Q(w)),        ∂w_AB/∂w = (1 - α)

  so no straight-through estimate is needed; ``α`` goes from 0 to 1 on
  :func:`alpha_blending_schedule`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import blaq_jax as bq
    >>> params = {"w": jnp.array([[0.2, -0.6], [0.4, -0.8]])}
    >>> spec = bq.quant_spec(params, bits=1)
    >>> print(np.asarray(bq.alpha_blend_params(params, spec, 0.5)["w"]).round(3))  # (w + Q(w)) / 2
    [[ 0.35 -0.55]
     [ 0.45 -0.65]]

  References:
    Liu & Mattina, `Learning low-precision neural networks without Straight-Through
    Estimator (STE) <https://arxiv.org/abs/1903.01061>`_, IJCAI 2019.

  Args:
    params: the latent parameters.
    spec: the tree from :func:`blaq_jax.quant_spec`.
    alpha: a scalar in ``[0, 1]`` (may be traced, e.g. a schedule's value).
    scale: the STE quantizer's scale, ``"fit"`` or ``"none"``.
  """
  check_scale(scale, "alpha_blend_params")
  if checks.is_concrete_number(alpha) and not 0 <= alpha <= 1:
    raise ValueError(f"alpha_blend_params: alpha must be in [0, 1], got {alpha}")
  spec_lib.check_spec_matches(spec, params, "alpha_blend_params")

  def blend(s, w):
    if s is None:
      return w
    q = jax.lax.stop_gradient(plain_quantize(w, s, scale))
    a = jnp.asarray(alpha, w.dtype)
    return (1 - a) * w + a * q

  return spec_lib.map_with_spec(blend, spec, params)


def alpha_blending_schedule(start_step: int, end_step: int, *, power: float = 3.0):
  """``α(t)``: 0 before ``start_step``, 1 after ``end_step``, in between
  ``1 - ((end_step - t) / (end_step - start_step))^power`` (Liu & Mattina use
  ``power = 3``; ``power = 1`` is a linear ramp). Returns an optax-style
  schedule (a function of the step count).

  Math::

      α(t) = 1 - clip((end_step - t) / (end_step - start_step), 0, 1)^power

  Examples:
    >>> import blaq_jax as bq
    >>> schedule = bq.alpha_blending_schedule(10, 20)
    >>> [round(float(schedule(step)), 3) for step in (0, 10, 15, 20, 30)]
    [0.0, 0.0, 0.875, 1.0, 1.0]

  References:
    Liu & Mattina, `Learning low-precision neural networks without Straight-Through
    Estimator (STE) <https://arxiv.org/abs/1903.01061>`_, IJCAI 2019.
  """
  for name, v in (("start_step", start_step), ("end_step", end_step)):
    if not checks.is_concrete_number(v, integer=True) or v < 0:
      raise ValueError(f"alpha_blending_schedule: {name} must be an int >= 0, got {v!r}")
  if end_step <= start_step:
    raise ValueError(
        f"alpha_blending_schedule: end_step ({end_step}) must be > start_step ({start_step})")
  if not checks.is_concrete_number(power) or not power > 0:
    raise ValueError(f"alpha_blending_schedule: power must be > 0, got {power!r}")

  def schedule(count):
    t = jnp.clip((end_step - jnp.asarray(count, jnp.float32)) / (end_step - start_step), 0, 1)
    return 1 - t ** power

  return schedule
