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

For the non-binary code sets the problem is solved, as in Algorithm 2 of
Ma et al. (2024) and the LAQ reference code, by alternating

    b     <- nearest code to w / alpha           (optimal for fixed alpha)
    alpha <- sum(D b w) / sum(D b^2)             (optimal for fixed b)

**to its fixed point**: until ``|Δalpha| <= tol · alpha`` for every scale, at
most ``max_iters`` rounds, in a ``lax.while_loop`` (so it jits). Each
half-step can only lower the objective. A cold start (:func:`quantize`, a
transform's ``init``) first evaluates the objective at a geometric grid of
candidate scales between ``mean_D |w| / 2`` and ``max |w|`` in one vectorised
pass and starts the alternation from the best one, so it needs a handful of
passes over the weights even at 8 bits, where the plain alternation from
``mean_D |w|`` creeps towards the optimum over dozens of rounds. In training
(:func:`blaq_jax.laq`, :func:`blaq_jax.blaq`) the alternation is warm-started
from the previous step's scale and usually stops after one or two rounds.
Neither ``tol`` nor ``max_iters`` is the BLAQ paper's ``m`` (the period of
its two-stage update, see :func:`blaq_jax.periodic_lookahead`).

The quantized weights are ``ŵ = alpha · code(w / alpha)``: given the scale,
the map is elementwise. The scale ``alpha`` is per tensor by default, or per
output channel (the last axis) with ``per_channel=True``. No gradient flows
through the scale (it is fitted to ``stop_gradient(w)``).

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

from blaq_jax._src import checks

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
    tol: the alternation stops when ``|Δalpha| <= tol · alpha`` for every
      scale (relative; the paper's Algorithm 2 uses ``1e-6``).
    max_iters: the most rounds of the alternation (a safety cap; a cold start
      from the grid and a warm start in training stop long before it).

  Neither ``tol`` nor ``max_iters`` is the BLAQ paper's ``m``.
  """

  bits: int
  scheme: str = "linear"
  per_channel: bool = False
  tol: float = 1e-6
  max_iters: int = 50

  def __post_init__(self):
    if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)):
      raise TypeError(f"QuantSpec: bits must be an int in 1..8, got {self.bits!r}")
    if not 1 <= int(self.bits) <= 8:
      raise ValueError(f"QuantSpec: bits must be in 1..8, got {self.bits}")
    if not isinstance(self.scheme, str) or self.scheme not in SCHEMES:
      raise ValueError(
          f"QuantSpec: unknown scheme {self.scheme!r}; expected one of {SCHEMES}")
    if self.scheme == "ternary" and self.bits != 2:
      raise ValueError(f"QuantSpec: scheme 'ternary' needs bits=2, got {self.bits}")
    if self.scheme == "log" and self.bits < 2:
      raise ValueError("QuantSpec: scheme 'log' needs bits >= 2 (1 bit is binary)")
    checks.boolean("QuantSpec", "per_channel", self.per_channel)
    if isinstance(self.max_iters, bool) or not isinstance(self.max_iters, (int, np.integer)):
      raise TypeError(f"QuantSpec: max_iters must be an int >= 1, got {self.max_iters!r}")
    if self.max_iters < 1:
      raise ValueError(f"QuantSpec: max_iters must be >= 1, got {self.max_iters}")
    if (isinstance(self.tol, (bool, np.bool_))
        or not isinstance(self.tol, (int, float, np.integer, np.floating))):
      raise TypeError(f"QuantSpec: tol must be a float in [0, 1), got {self.tol!r}")
    if not 0 <= self.tol < 1:
      raise ValueError(f"QuantSpec: tol must be a float in [0, 1), got {self.tol!r}")

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


def _reduce_axes(ndim: int, per_channel: bool):
  if per_channel and ndim >= 1:
    return tuple(range(ndim - 1))
  return tuple(range(ndim))


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


GRID_SIZE = 32   # candidate scales per level of a cold start
GRID_LEVELS = 3  # each level searches between the neighbours of the last best
GRID_BATCH = 8   # candidates evaluated together (a vectorised pass each)
GRID_SAMPLE = 65536  # weights per scale group the grid evaluates (strided)


def compute_dtype(dtype):
  """The dtype the projection computes in: float32 for half precision."""
  return jnp.float32 if dtype in (jnp.bfloat16, jnp.float16) else dtype


def scale_shape(shape, spec: QuantSpec) -> tuple:
  """The shape of a leaf's scale: ``shape`` with the reduced axes set to 1."""
  axes = _reduce_axes(len(shape), spec.per_channel)
  return tuple(1 if i in axes else n for i, n in enumerate(shape))


def _prepare(w, curvature, where):
  w = jnp.asarray(w)
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise TypeError(f"{where}: expected a floating array, got dtype {w.dtype}")
  wf = jax.lax.stop_gradient(w).astype(compute_dtype(w.dtype))
  if curvature is None:
    d = jnp.ones_like(wf)
  else:
    d = jax.lax.stop_gradient(jnp.broadcast_to(jnp.asarray(curvature, wf.dtype), wf.shape))
  return wf, d


def _grid_sample(wf, d, per_channel):
  """At most ``GRID_SAMPLE`` weights per scale group, evenly strided (static).

  The grid only picks the basin; the alternation that follows runs on every
  weight, so the result is a fixed point of the full problem.
  """
  if per_channel and wf.ndim >= 1:
    c = wf.shape[-1]
    rows = wf.reshape(-1, c)
    stride = -(-rows.shape[0] // max(GRID_SAMPLE // max(c, 1), 64))
    return rows[::stride], d.reshape(-1, c)[::stride]
  stride = -(-wf.size // GRID_SAMPLE)
  return wf.reshape(-1)[::stride], d.reshape(-1)[::stride]


def _cold_start(wf, d, spec, wsum, axes):
  """Minimises ``E(alpha) = sum D (w - alpha code(w/alpha))^2`` over a grid.

  ``GRID_LEVELS`` geometric grids of ``GRID_SIZE`` scales, the first over
  ``[mean_D|w|/2, max|w|]``, each next one between the neighbours of the
  previous best; each level evaluates ``GRID_BATCH`` candidates per
  vectorised pass (``lax.map``) over at most ``GRID_SAMPLE`` evenly strided
  weights per scale group. The
  fixed points of the alternation are the stationary points of ``E``, so the
  alternation that follows starts next to the best one in the range.
  """
  absw = jnp.abs(wf)
  lo = 0.5 * _safe_div(wsum(d * absw), wsum(d))
  hi = jnp.maximum(jnp.max(absw, axis=axes, keepdims=True), lo)
  out_shape = lo.shape
  wf, d = _grid_sample(wf, d, spec.per_channel)
  axes = _reduce_axes(wf.ndim, spec.per_channel)
  lo, hi = lo.reshape((1,) * (wf.ndim - 1) + (-1,)), hi.reshape((1,) * (wf.ndim - 1) + (-1,))
  frac = jnp.linspace(0.0, 1.0, GRID_SIZE, dtype=wf.dtype)

  def error(cand):  # E at one candidate scale per group
    return jnp.sum(d * (wf - cand * nearest_code(_safe_div(wf, cand), spec)) ** 2,
                   axis=axes, keepdims=True)

  for _ in range(GRID_LEVELS):
    ratio = _safe_div(hi, lo)
    cands = lo[None] * jnp.where(ratio > 0, ratio, 1)[None] ** frac.reshape(
        (-1,) + (1,) * wf.ndim)
    # A few candidates per pass: memory stays a small multiple of the leaf's.
    err = jax.lax.map(error, cands, batch_size=GRID_BATCH)
    best = jnp.argmin(err, axis=0, keepdims=True)
    pick = lambda k: jnp.take_along_axis(cands, jnp.clip(best + k, 0, GRID_SIZE - 1), 0)[0]
    lo, hi = pick(-1), pick(1)
  return pick(0).reshape(out_shape)


def fit_scale(w: jax.Array, spec: QuantSpec, curvature: Optional[jax.Array] = None,
              scale: Optional[jax.Array] = None, *, with_rounds: bool = False):
  """The scale ``alpha`` of the projection, at the alternation's fixed point.

  Args:
    w: the latent weights.
    spec: the :class:`QuantSpec`.
    curvature: ``D`` (None for 1).
    scale: a warm start (the previous step's ``alpha``, shape as returned);
      None for a cold start from the grid. Non-positive or non-finite entries
      start from ``sum(D|w|) / sum(D)`` instead.
    with_rounds: also return the number of alternation rounds run.

  Returns:
    ``alpha`` with the reduced axes kept (shape ``(1,..,1)`` or
    ``(1,..,1,c)``), float32 for half-precision ``w``, else ``w``'s dtype.
  """
  wf, d = _prepare(w, curvature, "fit_scale")
  axes = _reduce_axes(wf.ndim, spec.per_channel)

  def wsum(x):
    return jnp.sum(x, axis=axes, keepdims=True)

  if spec.is_binary:
    alpha = _safe_div(wsum(d * jnp.abs(wf)), wsum(d))
    return (alpha, jnp.zeros([], jnp.int32)) if with_rounds else alpha

  def lsq(alpha):
    b = nearest_code(_safe_div(wf, alpha), spec)
    return _safe_div(wsum(d * b * wf), wsum(d * b * b))

  if scale is None:
    alpha0 = _cold_start(wf, d, spec, wsum, axes)
  else:
    warm = jax.lax.stop_gradient(jnp.asarray(scale, wf.dtype))
    good = jnp.isfinite(warm) & (warm > 0)
    # Where the warm start is unusable (zeros of an abstract init), start from
    # the weighted mean |w|; the grid's memory is not paid in every step.
    alpha0 = jnp.where(good, warm, _safe_div(wsum(d * jnp.abs(wf)), wsum(d)))

  def cond(carry):
    i, _, done = carry
    return (i < spec.max_iters) & ~done

  def body(carry):
    i, alpha, _ = carry
    new = lsq(alpha)
    done = jnp.all(jnp.abs(new - alpha) <= spec.tol * jnp.abs(new))
    return i + 1, new, done

  rounds, alpha, _ = jax.lax.while_loop(cond, body, (jnp.zeros([], jnp.int32), alpha0,
                                                     jnp.array(False)))
  return (alpha, rounds) if with_rounds else alpha


def codes(w: jax.Array, spec: QuantSpec, alpha: jax.Array) -> jax.Array:
  """``code(w / alpha)``: the code values of ``w`` at scale ``alpha``.

  In the compute dtype (float32 for half-precision ``w``, else ``w``'s).
  """
  w = jnp.asarray(w)
  wf = w.astype(compute_dtype(w.dtype))
  if spec.is_binary:
    return nearest_code(wf, spec)
  return nearest_code(_safe_div(wf, jnp.asarray(alpha, wf.dtype)), spec)


def quantize_with_scale(w: jax.Array, spec: QuantSpec, alpha: jax.Array) -> jax.Array:
  """``ŵ = alpha · code(w / alpha)``: the projection at a given scale (elementwise).

  Computed in the compute dtype and cast to ``w``'s dtype.
  """
  w = jnp.asarray(w)
  alpha = jnp.asarray(alpha, compute_dtype(w.dtype))
  return (alpha * codes(w, spec, alpha)).astype(w.dtype)


def solve(w: jax.Array, spec: QuantSpec, curvature: Optional[jax.Array] = None,
          scale: Optional[jax.Array] = None):
  """Solves the weighted projection; returns ``(alpha, b)``.

  ``alpha`` is :func:`fit_scale`'s, ``b`` the code values ``code(w /
  alpha)``, both in the compute dtype (float32 for half-precision ``w``);
  ``ŵ = (alpha * b).astype(w.dtype)``.
  """
  alpha = fit_scale(w, spec, curvature, scale)
  return alpha, codes(w, spec, alpha)


def quantize(w: jax.Array, spec: QuantSpec,
             curvature: Optional[jax.Array] = None) -> jax.Array:
  """Returns ``ŵ = alpha · code(w / alpha)``, the loss-aware projection of ``w``.

  A cold start run to the alternation's fixed point (see the module
  docstring); ``D = 1`` if ``curvature`` is None.

  Args:
    w: a floating array (a layer's latent weights).
    spec: the :class:`QuantSpec` to project onto.
    curvature: the positive diagonal curvature ``D`` of ``w``'s shape (e.g.
      :func:`blaq_jax.curvature` of an optimizer state), or None for the plain
      projection. A concrete ``D`` with a NaN, inf or entry <= 0 is a
      ValueError (a traced one is not checked).
  """
  if not isinstance(spec, QuantSpec):
    raise TypeError(f"quantize: spec must be a QuantSpec, got {type(spec).__name__}")
  checks.positive_finite("quantize", "curvature", curvature)
  return quantize_with_scale(w, spec, fit_scale(w, spec, curvature))


# The plain (``D = 1``) projection of the STE family, dampening, freezing,
# alpha-blending and the diagnostics, and the index of a code in the codebook.

SCALES = ("fit", "none")


def check_scale(scale, where: str) -> None:
  """Raises a ``ValueError`` naming ``where`` unless ``scale`` is in :data:`SCALES`."""
  if scale not in SCALES:
    raise ValueError(f"{where}: scale must be one of {SCALES}, got {scale!r}")


def scale_and_codes(w: jax.Array, spec: QuantSpec, scale: str = "fit"):
  """Returns ``(alpha, b)`` of the plain projection (``alpha = 1`` if ``scale="none"``)."""
  if scale == "none":
    w = jnp.asarray(w)
    return jnp.ones([], w.dtype), nearest_code(w, spec)
  return solve(w, spec, None)


def plain_quantize(w: jax.Array, spec: QuantSpec, scale: str = "fit") -> jax.Array:
  """``Q(w)`` of the STE family, without a straight-through derivative."""
  alpha, b = scale_and_codes(w, spec, scale)
  return (alpha * b).astype(jnp.asarray(w).dtype)


def code_index(b: jax.Array, spec: QuantSpec) -> jax.Array:
  """Index (int32) of each code value ``b`` in ``spec.codebook()`` (ascending).

  ``b`` holds code values (e.g. from :func:`codes`); ``-0.0`` maps to the index
  of ``0``. A value that is not a code maps to some index in range, so a
  caller that may see one compares ``codebook()[index]`` with ``b``.
  Neighbouring codes have neighbouring indices, so the sign of a change of
  index is the direction in which the quantized weight moved.
  """
  b = jnp.asarray(b).astype(jnp.float32)
  if spec.is_binary:
    return (b > 0).astype(jnp.int32)
  if spec.scheme == "log":
    depth = spec.log_depth
    mag = jnp.abs(b)
    j = jnp.round(-jnp.log2(jnp.where(mag > 0, mag, 1.0)))
    level = jnp.where(mag > 0, jnp.sign(b) * (depth + 1 - j), 0.0)
    idx = level + depth + 1
  else:
    n = spec.levels
    idx = jnp.round(b * n) + n
  top = len(spec.codebook()) - 1
  return jnp.clip(jnp.nan_to_num(idx), 0, top).astype(jnp.int32)


def integer_codes(w: jax.Array, spec: QuantSpec, scale: str = "fit") -> jax.Array:
  """:func:`code_index` of the plain projection's codes of ``w`` (zeros when
  ``w`` is a ``jax.ShapeDtypeStruct``, so that a state can be built abstractly)."""
  if isinstance(w, jax.ShapeDtypeStruct):
    return jnp.zeros(w.shape, jnp.int32)
  return code_index(scale_and_codes(w, spec, scale)[1], spec)
