"""Straight-through (STE) quantization: BinaryConnect, BWN and k-bit uniform.

The STE family trains the latent weights ``w`` with any optimizer, using the
"coarse gradient" of Long et al.: the gradient of the loss taken AT the
quantized weights ``ŵ = Q(w)`` and applied to ``w`` as if ``Q`` were the
identity, followed by clipping the latent weights of quantized leaves::

    ŵ_t     = Q(w_t)
    g_t     = ∇ℓ(ŵ_t)                       (the straight-through gradient)
    w_{t+1} = clip(w_t + optimizer_update(g_t), -c, c)

The quantizer ``Q`` is the plain (``D = 1``) projection of
:func:`blaq_jax.quantize` onto the code set of the leaf's :class:`QuantSpec`,
with one STE-side choice, ``scale``:

* ``scale="fit"`` (default): ``Q(w) = alpha · b`` with the least-squares scale.
  With ``bits=1`` this is BWN, ``alpha = mean|w|`` (per tensor, or per output
  channel with ``QuantSpec(per_channel=True)``); with ``bits=k`` it is k-bit
  uniform quantization with a fitted scale (the alternation run to its fixed point).
* ``scale="none"``: ``alpha = 1``, ``Q(w)`` = the nearest code of ``w`` itself.
  With ``bits=1`` this is BinaryConnect, ``Q(w) = sign(w)``; with ``bits=k`` the
  fixed uniform grid ``round(clip(w, -1, 1) · n) / n``, ``n = 2^(k-1) - 1``.

So a user swaps methods by changing one argument: ``quant_spec(params,
bits=1)`` with ``scale="none"`` is BinaryConnect, with ``scale="fit"`` BWN;
``bits=4`` gives 4-bit uniform.

References: in the docstring of :func:`ste`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from blaq_jax._src import checks
from blaq_jax._src import spec as spec_lib
from blaq_jax._src import tree as tree_lib
from blaq_jax._src.quantizers import check_scale, plain_quantize
from blaq_jax._src.spec import QuantSpec, QuantSpecTree

def ste_quantize(w: jax.Array, spec: QuantSpec, *, scale: str = "fit") -> jax.Array:
  """``Q(w)`` in the forward pass, identity in the backward pass.

  A ``jax.custom_jvp`` whose value is exactly ``Q(w)`` (the form ``w +
  stop_gradient(Q(w) - w)`` is off by rounding) and whose derivative is the
  identity, so ``jax.grad`` through it returns the coarse gradient
  ``∇ℓ(ŵ)`` unchanged.

  Forward ``ŵ = Q(w) = α · code(w / α)``; backward ``∂ŵ/∂w := I`` (the
  straight-through estimator), so ``∇_w ℓ(Q(w)) = ∇ℓ(ŵ)``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import blaq_jax as bq
    >>> w = jnp.array([0.2, -0.6, 0.4, -0.8])
    >>> print(bq.ste_quantize(w, bq.QuantSpec(1)))
    [ 0.5 -0.5  0.5 -0.5]
    >>> print(jax.grad(lambda x: jnp.sum(bq.ste_quantize(x, bq.QuantSpec(1)) * jnp.arange(4.0)))(w))
    [0. 1. 2. 3.]

  References:
    BinaryConnect (Courbariaux et al., NeurIPS 2015), BWN (Rastegari et al.,
    ECCV 2016) and the coarse gradient (Long, Yin & Xin, 2020); see :func:`ste`.

  Args:
    w: a floating array.
    spec: the :class:`QuantSpec` of ``w``.
    scale: ``"fit"`` (BWN / fitted uniform) or ``"none"`` (BinaryConnect /
      fixed grid); see the module docstring.
  """
  if not isinstance(spec, QuantSpec):
    raise TypeError(f"ste_quantize: spec must be a QuantSpec, got {type(spec).__name__}")
  check_scale(scale, "ste_quantize")
  return _straight_through(jnp.asarray(w), spec, scale)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _straight_through(w, spec, scale):
  return plain_quantize(w, spec, scale)


@_straight_through.defjvp
def _straight_through_jvp(spec, scale, primals, tangents):
  (w,), (dw,) = primals, tangents
  return _straight_through(w, spec, scale), dw


def ste_quantize_params(params, spec: QuantSpecTree, *, scale: str = "fit"):
  """Maps the latent weights to ``ŵ`` with a straight-through derivative.

  Leaves whose spec is None are returned unchanged. ``jax.grad`` of a loss of
  ``ste_quantize_params(params, spec)`` with respect to ``params`` is the
  gradient at the quantized weights (the coarse gradient).

  Per quantized leaf ``ŵ = Q(w)`` forward and ``∂ŵ/∂w := I`` backward (see
  :func:`ste_quantize`).

  Examples:
    >>> import jax.numpy as jnp
    >>> import blaq_jax as bq
    >>> params = {"w": jnp.array([[0.2, -0.6], [0.4, -0.8]]), "b": jnp.array([0.3, -0.1])}
    >>> spec = bq.quant_spec(params, bits=1)
    >>> print(bq.ste_quantize_params(params, spec)["w"])
    [[ 0.5 -0.5]
     [ 0.5 -0.5]]

  References:
    BinaryConnect (Courbariaux et al., NeurIPS 2015), BWN (Rastegari et al.,
    ECCV 2016) and the coarse gradient (Long, Yin & Xin, 2020); see :func:`ste`.

  Args:
    params: the latent parameters.
    spec: the tree from :func:`blaq_jax.quant_spec`.
    scale: ``"fit"`` (BWN for 1 bit) or ``"none"`` (BinaryConnect for 1 bit).
  """
  check_scale(scale, "ste_quantize_params")
  spec_lib.check_spec_matches(spec, params, "ste_quantize_params")
  return spec_lib.map_with_spec(
      lambda s, w: w if s is None else ste_quantize(w, s, scale=scale), spec, params)


class STEState(NamedTuple):
  """State of :func:`ste`: the wrapped optimizer's state."""

  inner_state: Any


def ste(
    optimizer: optax.GradientTransformation,
    spec: QuantSpecTree,
    *,
    clip: float | None = 1.0,
) -> optax.GradientTransformationExtraArgs:
  """Trains latent weights with ``optimizer`` and clips the quantized leaves.

  One step: ``w ← clip(w + optimizer.update(g, ...), -clip, clip)`` for leaves
  whose spec is a :class:`QuantSpec`; other leaves take the optimizer's update
  unchanged. ``g`` must be the gradient at the quantized weights, e.g.
  ``jax.grad(loss)(ste_quantize_params(params, spec))`` (the same values as
  ``jax.grad(lambda p: loss(ste_quantize_params(p, spec)))(params)``).

  Example (BWN trained with Adam)::

    spec = bq.quant_spec(params, bits=1)
    tx = bq.ste(optax.adam(1e-3), spec)
    grads = jax.grad(lambda p: loss(bq.ste_quantize_params(p, spec)))(params)
    updates, state = tx.update(grads, state, params)

  The straight-through (coarse-gradient) step, for a quantized leaf::

      ŵ_t     = Q(w_t) = α · code(w_t / α)       (ste_quantize_params)
      g_t     = ∇ℓ(ŵ_t)                          (given as ``updates``)
      u_t     = optimizer.update(g_t)
      w_{t+1} = clip(w_t + u_t, -c, c)

  with ``α`` the least-squares scale (``scale="fit"``; BWN: ``α = mean|w|``
  at 1 bit) or 1 (``scale="none"``; BinaryConnect: ``Q(w) = sign(w)``).

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import optax
    >>> import blaq_jax as bq
    >>> params = {"w": jnp.array([[0.2, -0.6], [0.4, -0.8]]), "b": jnp.array([0.3, -0.1])}
    >>> spec = bq.quant_spec(params, bits=1)
    >>> tx = bq.ste(optax.sgd(0.1), spec)
    >>> loss = lambda p: jnp.sum((p["w"] - 0.5) ** 2) + jnp.sum(p["b"] ** 2)
    >>> grads = jax.grad(loss)(bq.ste_quantize_params(params, spec))
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> print(np.asarray(updates["w"]).round(3))  # the step on the latent weights
    [[0.  0.2]
     [0.  0.2]]

  References:
    Courbariaux, Bengio & David, `BinaryConnect: Training Deep Neural Networks with
    binary weights during propagations <https://arxiv.org/abs/1511.00363>`_, NeurIPS
    2015.
    Rastegari, Ordonez, Redmon & Farhadi, `XNOR-Net: ImageNet Classification Using
    Binary Convolutional Neural Networks <https://arxiv.org/abs/1603.05279>`_, ECCV
    2016 (BWN).
    Long, Yin & Xin, `Recurrence of Optimum for Training Weight and Activation
    Quantized Networks <https://arxiv.org/abs/2012.05529>`_, 2020 (coarse gradient).

  Args:
    optimizer: any optax transform (extra keyword arguments of ``update`` are
      passed through to it).
    spec: the tree from :func:`blaq_jax.quant_spec`.
    clip: latent weights of quantized leaves stay in ``[-clip, clip]`` (None
      disables clipping). Works with ``optax.inject_hyperparams`` (``clip``
      becomes a hyperparameter; the range check is then skipped).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.
  """
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(
        f"ste: optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}")
  checks.number("ste", "clip", clip, lo=0, lo_open=True, none_ok=True)
  spec_lib.check_spec_arg(spec, "ste")
  inner = optax.with_extra_args_support(optimizer)

  def init_fn(params):
    spec_lib.check_spec_matches(spec, params, "ste.init")
    return STEState(inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    checks.require_params("ste.update", params)
    tree_lib.check_like_params(updates, params, "updates", "ste.update")
    updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    if clip is not None:

      def clip_leaf(s, u, w):
        if s is None:
          return u
        return (jnp.clip(w + u, -clip, clip) - w).astype(u.dtype)

      updates = spec_lib.map_with_spec(clip_leaf, spec, updates, params)
    return updates, STEState(inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
