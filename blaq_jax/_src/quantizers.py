"""Weight quantizers: the (loss-aware) projection onto a low-bit code set.

For one array ``w`` with curvature ``D > 0`` (``D = 1`` for the plain
projection) the quantizer solves

    min_{alpha > 0, b in C^n}  sum_i D_i (w_i - alpha b_i)^2

for the code set ``C`` of the spec:

* binary (``bits=1``):  ``C = {-1, +1}``; closed form ``b = sign(w)`` (with
  ``sign(0) = +1``) and ``alpha = sum(D |w|) / sum(D)``.
* k-bit linear (``bits=k >= 2``): ``C = {-1, ..., -1/n, 0, 1/n, ..., 1}``
  with ``n = 2^(k-1) - 1``.  Ternary is the ``k = 2`` case.
* k-bit log (``bits=k >= 2``): ``C = {0} U {+-2^-j : j = 0..2^(k-1)-2}``.

For the non-binary code sets the problem is solved by alternating, for a fixed
number ``iters`` of rounds (no data-dependent control flow, so it jits):

    b     <- nearest code to w / alpha           (optimal for fixed alpha)
    alpha <- sum(D b w) / sum(D b^2)             (optimal for fixed b)

starting from ``alpha = sum(D |w|) / sum(D)``.  Each half-step can only lower
the objective, so the result is never worse than one round of plain rounding.
The scale ``alpha`` is per tensor by default, or per output channel (the last
axis) with ``per_channel=True``.

References:
  Hou, Yao & Kwok, "Loss-aware Binarization of Deep Networks", ICLR 2017.
  Hou & Kwok, "Loss-aware Weight Quantization of Deep Networks", ICLR 2018.
  Ma et al., "One-Step Forward and Backtrack: Overcoming Zig-Zagging in
  Loss-Aware Quantization Training", AAAI 2024.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

SCHEMES = ("linear", "log", "ternary")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How one array is quantized.

  Attributes:
    bits: 1 to 8. ``bits=1`` is binary (scheme ``"linear"``).
    scheme: ``"linear"`` (uniform codes), ``"log"`` (powers of two, ``bits >=
      2``) or ``"ternary"`` (``{-1, 0, 1}``, requires ``bits=2``).
    per_channel: one scale per output channel (last axis) instead of one per
      tensor.
    iters: rounds of the alpha/b alternation (the paper's ``m``).
  """

  bits: int
  scheme: str = "linear"
  per_channel: bool = False
  iters: int = 5

  def __post_init__(self):
    if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)):
      raise TypeError(f"QuantSpec: bits must be an int in 1..8, got {self.bits!r}")
    if not 1 <= int(self.bits) <= 8:
      raise ValueError(f"QuantSpec: bits must be in 1..8, got {self.bits}")
    if self.scheme not in SCHEMES:
      raise ValueError(
          f"QuantSpec: unknown scheme {self.scheme!r}; expected one of {SCHEMES}")
    if self.scheme == "ternary" and self.bits != 2:
      raise ValueError(f"QuantSpec: scheme 'ternary' needs bits=2, got {self.bits}")
    if self.scheme == "log" and self.bits < 2:
      raise ValueError("QuantSpec: scheme 'log' needs bits >= 2 (1 bit is binary)")
    if isinstance(self.iters, bool) or not isinstance(self.iters, (int, np.integer)):
      raise TypeError(f"QuantSpec: iters must be an int >= 1, got {self.iters!r}")
    if self.iters < 1:
      raise ValueError(f"QuantSpec: iters must be >= 1, got {self.iters}")

  @property
  def is_binary(self) -> bool:
    return self.bits == 1

  @property
  def levels(self) -> int:
    """``n`` of the linear code set (codes are multiples of ``1/n``)."""
    return 2 ** (self.bits - 1) - 1

  @property
  def log_depth(self) -> int:
    """``J`` of the log code set (smallest non-zero magnitude ``2^-J``)."""
    return 2 ** (self.bits - 1) - 2

  def codebook(self) -> np.ndarray:
    """All code values, sorted ascending (float64)."""
    if self.is_binary:
      return np.array([-1.0, 1.0])
    if self.scheme == "log":
      mags = 2.0 ** -np.arange(self.log_depth + 1, dtype=np.float64)
      return np.concatenate([-mags, [0.0], mags[::-1]])
    n = self.levels
    return np.arange(-n, n + 1, dtype=np.float64) / n


def _reduce_axes(w: jax.Array, per_channel: bool):
  if per_channel and w.ndim >= 1:
    return tuple(range(w.ndim - 1))
  return tuple(range(w.ndim))


def _safe_div(num, den):
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def _nearest_linear(x, n):
  return jnp.round(jnp.clip(x, -1, 1) * n) / n


def _nearest_log(x, depth):
  """Nearest code in {0} U {+-2^-j, j=0..depth} (nearest in value)."""
  mag = jnp.minimum(jnp.abs(x), 1)
  mant, expo = jnp.frexp(mag)  # mag = mant * 2^expo, mant in [0.5, 1)
  lower = jnp.ldexp(jnp.ones_like(mag), expo - 1)
  # mag in [lower, 2 lower): the midpoint of the two powers is 1.5 lower.
  p = jnp.where(mant < 0.75, lower, 2 * lower)
  smallest = 2.0 ** -depth
  p = jnp.clip(p, smallest, 1)
  p = jnp.where(mag <= smallest / 2, 0, p).astype(x.dtype)
  return jnp.where(x < 0, -p, p)


def nearest_code(x: jax.Array, spec: QuantSpec) -> jax.Array:
  """Rounds ``x`` (already divided by the scale) to the nearest code."""
  if spec.is_binary:
    return jnp.where(x >= 0, 1, -1).astype(x.dtype)
  if spec.scheme == "log":
    return _nearest_log(x, spec.log_depth)
  return _nearest_linear(x, spec.levels)


def solve(w: jax.Array, spec: QuantSpec, curvature: Optional[jax.Array] = None):
  """Solves the weighted projection; returns ``(alpha, b)`` with ``w ~ alpha*b``.

  ``alpha`` has the reduced axes kept (shape ``()``-like or ``(1,..,1,c)``),
  ``b`` holds code values of the code set, in ``w``'s dtype.
  """
  w = jnp.asarray(w)
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise TypeError(f"quantize: expected a floating array, got dtype {w.dtype}")
  dtype = w.dtype
  wf = w.astype(jnp.float32) if dtype in (jnp.bfloat16, jnp.float16) else w
  if curvature is None:
    d = jnp.ones_like(wf)
  else:
    d = jnp.broadcast_to(jnp.asarray(curvature, wf.dtype), wf.shape)
  axes = _reduce_axes(wf, spec.per_channel)

  def wsum(x):
    return jnp.sum(x, axis=axes, keepdims=True)

  absw = jnp.abs(wf)
  alpha = _safe_div(wsum(d * absw), wsum(d))
  if spec.is_binary:
    b = nearest_code(wf, spec)
  else:
    for _ in range(spec.iters):
      b = nearest_code(_safe_div(wf, alpha), spec)
      alpha = _safe_div(wsum(d * b * wf), wsum(d * b * b))
  return alpha.astype(dtype), b.astype(dtype)


def quantize(w: jax.Array, spec: QuantSpec,
             curvature: Optional[jax.Array] = None) -> jax.Array:
  """Returns ``alpha * b``, the loss-aware projection of ``w`` (``D=1`` if None).

  Args:
    w: a floating array (a layer's latent weights).
    spec: the :class:`QuantSpec` to project onto.
    curvature: the positive diagonal curvature ``D`` of ``w``'s shape (e.g.
      :func:`blaq_jax.curvature` of an optimizer state), or None for the plain
      projection.
  """
  if not isinstance(spec, QuantSpec):
    raise TypeError(f"quantize: spec must be a QuantSpec, got {type(spec).__name__}")
  alpha, b = solve(w, spec, curvature)
  return alpha * b


def objective(w, alpha, b, curvature=None):
  """``sum D (w - alpha b)^2`` per scale group (all axes summed if per tensor)."""
  d = 1.0 if curvature is None else curvature
  return jnp.sum(d * (w - alpha * b) ** 2)
