"""Coarse-gradient activation quantizers: quantized ReLU and sign.

Their true derivative is zero almost everywhere, so the backward pass uses the
derivative of a "proxy" function instead (the coarse gradient / straight-
through estimator of Long et al.). For ``quantize_activation`` with ``k`` bits
and range ``[0, c]`` (``c = max_value``, ``L = 2^k - 1`` steps)::

    forward:  σ(x) = c · round(L · clip(x / c, 0, 1)) / L
    backward: σ'(x) := 1                 proxy "identity"
                       1[0 < x < c]      proxy "clipped_relu" (default)
                       1[x > 0]          proxy "relu"

and for ``sign_activation``::

    forward:  sign(x)  (sign(0) = +1)
    backward: 1                          proxy "identity"
              1[|x| <= 1]                proxy "htanh" (default; hard tanh)

Both are ``jax.custom_jvp`` functions, so they work under ``jax.grad``,
``jax.jvp``, ``jit`` and ``vmap``.

References:
  Long, Yin & Xin, `Recurrence of Optimum for Training Weight and Activation
  Quantized Networks <https://arxiv.org/abs/2012.05529>`_, 2020.
  Yin, Lyu, Zhang, Osher, Qi & Xin, `Understanding Straight-Through Estimator in
  Training Activation Quantized Neural Nets <https://arxiv.org/abs/1903.05662>`_,
  ICLR 2019.
  Hubara, Courbariaux, Soudry, El-Yaniv & Bengio, `Binarized Neural Networks
  <https://arxiv.org/abs/1602.02830>`_, NeurIPS 2016 (sign with the hard-tanh
  proxy).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from blaq_jax._src import checks

ACTIVATION_PROXIES = ("identity", "clipped_relu", "relu")
SIGN_PROXIES = ("identity", "htanh")


def _staircase(x, bits, max_value):
  steps = 2 ** bits - 1
  return max_value * jnp.round(steps * jnp.clip(x / max_value, 0, 1)) / steps


def _activation_proxy_grad(x, proxy, max_value):
  if proxy == "identity":
    return jnp.ones_like(x)
  if proxy == "relu":
    return (x > 0).astype(x.dtype)
  return ((x > 0) & (x < max_value)).astype(x.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _quantized_relu(x, bits, proxy, max_value):
  return _staircase(x, bits, max_value)


@_quantized_relu.defjvp
def _quantized_relu_jvp(bits, proxy, max_value, primals, tangents):
  (x,), (x_dot,) = primals, tangents
  y = _staircase(x, bits, max_value)
  return y, _activation_proxy_grad(x, proxy, max_value) * x_dot


def quantize_activation(x: jax.Array, bits: int, *, proxy: str = "clipped_relu",
                        max_value: float = 1.0) -> jax.Array:
  """Quantized ReLU with ``2^bits`` levels on ``[0, max_value]``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import blaq_jax as bq
    >>> x = jnp.array([-0.5, 0.2, 0.6, 1.4])
    >>> print(np.asarray(bq.quantize_activation(x, bits=2, max_value=1.0)).round(3))
    [0.    0.333 0.667 1.   ]

  Args:
    x: a floating array of pre-activations.
    bits: 1 to 8; the output takes ``2^bits`` values ``max_value · i / (2^bits - 1)``.
    proxy: the straight-through derivative: ``"identity"``, ``"clipped_relu"``
      (``1`` on ``0 < x < max_value``) or ``"relu"`` (``1`` on ``x > 0``).
    max_value: the clipping level ``c > 0``.
  """
  if not checks.is_concrete_number(bits, integer=True) or not 1 <= bits <= 8:
    raise ValueError(f"quantize_activation: bits must be an int in 1..8, got {bits!r}")
  if proxy not in ACTIVATION_PROXIES:
    raise ValueError(
        f"quantize_activation: proxy must be one of {ACTIVATION_PROXIES}, got {proxy!r}")
  if not checks.is_concrete_number(max_value) or not max_value > 0:
    raise ValueError(f"quantize_activation: max_value must be a number > 0, got {max_value!r}")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"quantize_activation: x must be floating, got dtype {x.dtype}")
  return _quantized_relu(x, int(bits), proxy, float(max_value))


def _sign(x):
  return jnp.where(x >= 0, 1, -1).astype(x.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _sign_ste(x, proxy):
  return _sign(x)


@_sign_ste.defjvp
def _sign_ste_jvp(proxy, primals, tangents):
  (x,), (x_dot,) = primals, tangents
  if proxy == "identity":
    grad = jnp.ones_like(x)
  else:
    grad = (jnp.abs(x) <= 1).astype(x.dtype)
  return _sign(x), grad * x_dot


def sign_activation(x: jax.Array, *, proxy: str = "htanh") -> jax.Array:
  """``sign(x)`` (with ``sign(0) = +1``) with a straight-through derivative.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import blaq_jax as bq
    >>> x = jnp.array([-0.5, 0.2, 0.6, 1.4])
    >>> print(bq.sign_activation(x))
    [-1.  1.  1.  1.]
    >>> print(jax.grad(lambda v: jnp.sum(bq.sign_activation(v)))(x))  # hard-tanh proxy
    [1. 1. 1. 0.]

  Args:
    x: a floating array.
    proxy: ``"htanh"`` (derivative ``1[|x| <= 1]``, the hard-tanh proxy) or
      ``"identity"`` (derivative 1).
  """
  if proxy not in SIGN_PROXIES:
    raise ValueError(f"sign_activation: proxy must be one of {SIGN_PROXIES}, got {proxy!r}")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"sign_activation: x must be floating, got dtype {x.dtype}")
  return _sign_ste(x, proxy)
