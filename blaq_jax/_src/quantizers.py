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

Each half-step can only lower the objective, and its fixed points are the
stationary points of ``E(alpha) = min_b sum D (w - alpha b)^2``, which has
many local minima (at high widths, a ripple of them). Two solvers use it:

* **Cold start** (:func:`quantize`, a transform's ``init``, export): the
  alternation run to its fixed point (``|Δalpha| <= tol · alpha`` for every
  scale, at most ``max_iters`` rounds, in a ``lax.while_loop``) from three
  starts: the best of a geometric grid of scales between ``mean_D |w| / 2``
  and ``max |w|`` (``4/3 max |w|`` for log codes), ``max |w|`` itself and
  ``mean_D |w|``. Each scale group keeps the best of the three.
* **Warm start** (a training step of :func:`blaq_jax.laq` and
  :func:`blaq_jax.blaq`, from the last step's scale): a fixed amount of work,
  no loop to a tolerance. A search on a strided sample of the weights over
  scales within a factor 2 of the last one picks the basin; below 4 bits one
  full round follows. From 4 bits on, where the optimum depends on the few
  largest weights that a sample misses, one pass evaluates the exact error
  at three nearby scales and fits a parabola, and a last pass takes a round
  from the best of that parabola's minimiser, the best of the three and
  ``max |w|``. The sums of a pass come out of multi-output reductions of at
  most three sums each (:func:`group_sums`): the refinement reads the
  weights once, the last round once per candidate.

Neither ``tol`` nor ``max_iters`` is the BLAQ paper's ``m`` (the period of
its two-stage update, see :func:`blaq_jax.periodic_lookahead`). How close
each solver comes to the best fixed point, and what it costs, is measured by
``python -m benchmarks.projection`` (benchmarks/README.md).

The quantized weights are ``ŵ = alpha · code(w / alpha)``: given the scale,
the map is elementwise. The scale ``alpha`` is per tensor by default, per
output channel (the last axis) with ``per_channel=True``, or per group of
``g`` consecutive weights along the input axis (axis -2, the ``in`` of a
dense kernel ``(in, out)`` and the ``c_in`` of a conv kernel ``(h, w, c_in,
c_out)``) and per output channel with ``group_size=g``: the scale then has
the kernel's shape with axis -2 divided by ``g`` (``(in // g, out)``,
``(h, w, c_in // g, c_out)``), and each group is its own instance of the
problem above. No gradient flows through the scale (it is fitted to
``stop_gradient(w)``).

References:
  Hou, Yao & Kwok, `Loss-aware Binarization of Deep Networks
  <https://arxiv.org/abs/1611.01600>`_, ICLR 2017.
  Hou & Kwok, `Loss-aware Weight Quantization of Deep Networks
  <https://arxiv.org/abs/1802.08635>`_, ICLR 2018.
  Ma et al., `One-Step Forward and Backtrack: Overcoming Zig-Zagging in Loss-Aware
  Quantization Training <https://doi.org/10.1609/aaai.v38i13.29336>`_, AAAI 2024.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, TypeAlias, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from blaq_jax._src import checks
from blaq_jax._src import spec as spec_lib
from blaq_jax._src import tree as tree_lib
from blaq_jax._src.spec import QuantSpec, check_group_shape


# The layout of a spec's scale groups, as the projection's helpers take it:
# False (per tensor), True (per output channel), or GROUP: the weights in the
# grouped view ``(..., in // g, g, out)`` of :func:`group_view`, one scale per
# group of the ``g`` axis (axis -2 of the view).
GROUP: Literal["group"] = "group"
Layout: TypeAlias = bool | Literal["group"]


def layout(spec: QuantSpec) -> Layout:
  """``False``, ``True`` or :data:`GROUP`: how ``spec`` groups the weights."""
  return GROUP if spec.group_size is not None else spec.per_channel


def _reduce_axes(ndim: int, per_channel: Layout) -> tuple[int, ...]:
  if per_channel is GROUP:
    return (ndim - 2,)
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


GRID_SIZE = 33   # candidate scales per level of a cold start (a multiple of SUM_OUTPUTS)
GRID_LEVELS = 3  # each level searches between the neighbours of the last best
GRID_SAMPLE = 65536  # weights per scale group the grid evaluates (strided)

# The warm start of a training step: a search on a strided sample of the
# weights around the last step's scale, then one full round.
SEARCH_CANDIDATES = 9   # per level; odd (the centre is a candidate), a multiple of SUM_OUTPUTS
SEARCH_LEVELS = 4       # each level spans one candidate step of the last
SEARCH_SPAN = 2.0       # the first level spans [alpha / 2, 2 alpha]
SEARCH_FRACTION = 256   # the sample holds 1/256 of the weights ...
SEARCH_MIN_SAMPLE = 16384  # ... but at least this many per tensor (or all)
SEARCH_MIN_ROWS = 256   # ... and per output channel (per-channel scales)


def compute_dtype(dtype):
  """The dtype the projection computes in: float32 for half precision."""
  return jnp.float32 if dtype in (jnp.bfloat16, jnp.float16) else dtype


def group_view(shape, spec: QuantSpec) -> tuple:
  """``(..., in, out)`` as ``(..., in // g, g, out)``: the groups on axis -2."""
  shape = tuple(shape)
  g = spec.group_size
  return shape[:-2] + (shape[-2] // g, g, shape[-1])


def _explicit_spec(x) -> tuple | None:
  """``x``'s partition spec, one entry per axis, when its type carries a
  sharding (``jax.sharding.AxisType.Explicit``); else None."""
  try:
    sharding = jax.typeof(x).sharding
    spec = tuple(sharding.spec)
  except AttributeError:
    return None
  if not any(axis is not None for axis in spec):
    return None
  return spec + (None,) * (jnp.ndim(x) - len(spec))


def _mesh_size(x, axes) -> int:
  """How many devices the mesh axes ``axes`` of ``x``'s sharding span."""
  shape = jax.typeof(x).sharding.mesh.shape
  return math.prod(shape[name] for name in (axes if isinstance(axes, tuple) else (axes,)))


def to_group_view(x, spec: QuantSpec):
  """``x`` of shape ``(..., in, out)`` reshaped to :func:`group_view`. Under
  explicit sharding the groups' axis keeps the input axis's sharding where
  the mesh divides ``in // g``; otherwise that axis is gathered first."""
  view = group_view(x.shape, spec)
  parts = _explicit_spec(x)
  if parts is None:
    return x.reshape(view)
  split = parts[-2]
  if split is not None and view[-3] % _mesh_size(x, split):
    split = None
    x = jax.sharding.reshard(x, P(*parts[:-2], None, parts[-1]))
  return jnp.reshape(x, view, out_sharding=P(*parts[:-2], split, None, parts[-1]))


def from_group_view(x, shape):
  """A grouped scale ``(..., in // g, 1, out)`` reshaped to ``shape``
  ``(..., in // g, out)``, keeping its sharding under explicit sharding."""
  parts = _explicit_spec(x)
  if parts is None:
    return x.reshape(shape)
  return jnp.reshape(x, shape, out_sharding=P(*parts[:-3], parts[-3], parts[-1]))


def scale_shape(shape, spec: QuantSpec) -> tuple:
  """The shape of a leaf's scale: ``shape`` with the reduced axes set to 1
  (per tensor, per channel), or with axis -2 divided by ``group_size``."""
  if spec.group_size is not None:
    check_group_shape(shape, spec)
    shape = tuple(shape)
    return shape[:-2] + (shape[-2] // spec.group_size, shape[-1])
  return _kept_shape(shape, spec.per_channel)


def expand_scale(alpha, spec: QuantSpec, shape):
  """``alpha`` broadcastable to a leaf of ``shape``: a group-wise scale is
  repeated ``group_size`` times along axis -2; other scales are returned as
  they are (their reduced axes already have size 1)."""
  if spec.group_size is None or jnp.ndim(alpha) < 2:
    return alpha
  parts = _explicit_spec(alpha)
  return jnp.repeat(alpha, spec.group_size, axis=-2, total_repeat_length=tuple(shape)[-2],
                    out_sharding=None if parts is None else P(*parts))


def _kept_shape(shape, per_channel: Layout) -> tuple:
  axes = _reduce_axes(len(shape), per_channel)
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


def _explicitly_sharded(x) -> bool:
  """Whether ``x``'s type carries a sharding (``jax.sharding.AxisType.Explicit``)."""
  try:
    spec = jax.typeof(x).sharding.spec
  except AttributeError:
    return False
  return any(axis is not None for axis in spec)


# XLA:CPU vectorises a multi-output reduction across its lanes only while the
# fused loop over a block's rows stays small enough to unroll: at most
# SUM_OUTPUTS sums per reduction over blocks of SUM_ROWS rows (SUM_ROWS_LOG
# for the log codes' longer code computation). Measured on a 2048² kernel:
# a round's two sums of 4-bit linear codes took 6.7 ms over blocks of 16
# rows and 1.8 ms over blocks of 8; the three errors of a refinement 15.5 ms
# and 2.6 ms; nine sums in one reduction 23 ms, as three reductions 6 ms.
SUM_ROWS = 8
SUM_ROWS_LOG = 4
SUM_OUTPUTS = 3


def sum_rows(spec: QuantSpec) -> int:
  """The block rows of :func:`group_sums` for sums over ``spec``'s codes."""
  return SUM_ROWS_LOG if spec.scheme == "log" and not spec.is_binary else SUM_ROWS


def group_sums(xs, per_channel, rows: int = SUM_ROWS):
  """``[Σ x for x in xs]`` per scale group (reduced axes kept).

  ``per_channel`` is False (one sum per array), True (per output channel,
  the last axis) or :data:`GROUP` (``xs`` in the grouped view ``(..., in //
  g, g, out)``: sums over axis -2).

  Every ``SUM_OUTPUTS`` sums come out of one multi-output ``lax.reduce``
  over blocks of ``rows`` rows of the arrays, so the elementwise producers
  of ``xs`` fuse into the reduction and the weights are read once per
  reduction; a ``jnp.sum`` per array would materialise each input (on
  XLA:CPU they run as library reductions), several passes over the weights.
  The partial sums (``1/rows`` of the leaf) are then summed as buffers.
  """
  xs = tuple(xs)
  if len(xs) > SUM_OUTPUTS:
    return [s for i in range(0, len(xs), SUM_OUTPUTS)
            for s in group_sums(xs[i:i + SUM_OUTPUTS], per_channel, rows)]
  shape = xs[0].shape
  out = _kept_shape(shape, per_channel)
  if _explicitly_sharded(xs[0]):
    # A reshape across a sharded axis is refused in explicit-sharding mode.
    axes = _reduce_axes(len(shape), per_channel)
    return [jnp.sum(x, axis=axes, keepdims=True) for x in xs]
  zeros = tuple(jnp.zeros([], x.dtype) for x in xs)
  add = lambda p, q: tuple(u + v for u, v in zip(p, q))
  # Blocks (n // k, k, c) summed over the k rows: the reduction runs along
  # contiguous rows of c lanes. (XLA:CPU runs a multi-output reduction along
  # the contiguous axis, or over a long outer axis, several times slower.)
  per_tensor = not (per_channel and len(shape) >= 1)
  if per_channel is GROUP:
    g = shape[-2]
    k = math.gcd(g, rows)
    blocks = shape[:-2] + (g // k, k, shape[-1])
    axis = len(shape) - 1
  else:
    size = xs[0].size
    c = math.gcd(size, 1024) if per_tensor else shape[-1]
    n = size // max(c, 1)
    k = math.gcd(n, rows)
    blocks = (n // k, k, c)
    axis = 1
  parts = jax.lax.reduce(tuple(x.reshape(blocks) for x in xs), zeros, add, (axis,))
  # The partial sums as buffers: how XLA sums them then does not depend on
  # the surrounding graph.
  parts = jax.lax.optimization_barrier(parts)
  if per_channel is GROUP:
    return [jnp.sum(p, axis=-2, keepdims=True) for p in parts]
  if per_tensor:
    return [jnp.sum(p).reshape(out) for p in parts]
  return [jnp.sum(p, 0).reshape(out) for p in parts]


def _strided_sample(wf, d, per_channel, per_group: int):
  """At most ``per_group`` weights per scale group, evenly strided (static)."""
  if per_channel is GROUP:
    stride = -(-wf.shape[-2] // max(per_group, 1))
    return wf[..., ::stride, :], d[..., ::stride, :]
  if per_channel and wf.ndim >= 1:
    c = wf.shape[-1]
    rows = wf.reshape(-1, c)
    stride = -(-rows.shape[0] // max(per_group, 1))
    return rows[::stride], d.reshape(-1, c)[::stride]
  stride = -(-wf.size // max(per_group, 1))
  return wf.reshape(-1)[::stride], d.reshape(-1)[::stride]


def _grid_sample(wf, d, per_channel):
  """The cold start's sample: at most ``GRID_SAMPLE`` weights per scale group
  (at least 64 rows per channel).

  The grid only picks the basin; the alternation that follows runs on every
  weight, so the result is a fixed point of the full problem.
  """
  if per_channel is GROUP:
    groups = wf.size // max(wf.shape[-2], 1)
    return _strided_sample(wf, d, GROUP, max(GRID_SAMPLE // max(groups, 1), 64))
  c = wf.shape[-1] if per_channel and wf.ndim >= 1 else 1
  per_group = max(GRID_SAMPLE // max(c, 1), 64) if c > 1 else GRID_SAMPLE
  return _strided_sample(wf, d, per_channel, per_group)


def _search_sample(wf, d, per_channel):
  """The warm search's sample: ``1/SEARCH_FRACTION`` of each scale group's
  weights, at least ``SEARCH_MIN_SAMPLE`` per tensor or ``SEARCH_MIN_ROWS``
  per channel or group (all of a small group)."""
  if per_channel is GROUP:
    per_group = max(wf.shape[-2] // SEARCH_FRACTION, SEARCH_MIN_ROWS)
    return _strided_sample(wf, d, GROUP, per_group)
  if per_channel and wf.ndim >= 1:
    rows = wf.size // max(wf.shape[-1], 1)
    return _strided_sample(wf, d, True, max(rows // SEARCH_FRACTION, SEARCH_MIN_ROWS))
  return _strided_sample(wf, d, False, max(wf.size // SEARCH_FRACTION, SEARCH_MIN_SAMPLE))


def _sample_errors(ws, ds, spec, cands):
  """``Σ D (w - c code(w / c))²`` per scale group of the sample, stacked, for
  each ``c`` of ``cands`` (of the scale's shape in the sample's layout, see
  :func:`_group_row`), a few per reduction (:func:`group_sums`): a
  reduction along the sample's contiguous axis runs several times slower."""
  return jnp.stack(group_sums(
      tuple(ds * (ws - c * nearest_code(_safe_div(ws, c), spec)) ** 2 for c in cands),
      layout(spec), sum_rows(spec)))


def _group_row(x, ndim, per_channel=False):
  """A scale of shape ``(1,..,1)`` or ``(1,..,1,c)`` as ``(1,..,1, groups)``
  of ``ndim`` axes (the sample's layout); a group-wise scale, already in the
  grouped view's layout, as it is."""
  if per_channel is GROUP:
    return x
  return x.reshape((1,) * (ndim - 1) + (-1,))


def _cold_start(wf, d, spec, wsum, axes):
  """Minimises ``E(alpha) = sum D (w - alpha code(w/alpha))^2`` over a grid.

  ``GRID_LEVELS`` geometric grids of ``GRID_SIZE`` scales, the first over
  ``[mean_D|w|/2, max|w|]`` (``4/3 max|w|`` for log codes, whose top code
  takes ``|w| > 3/4 alpha``), each next one between the neighbours of the
  previous best; each level evaluates ``SUM_OUTPUTS`` candidates per pass
  (a ``lax.map``) over at most ``GRID_SAMPLE`` evenly strided weights per
  scale group. The fixed points of the alternation are the
  stationary points of ``E``, so the alternation that follows starts next to
  the best one in the range.
  """
  absw = jnp.abs(wf)
  lo = 0.5 * _safe_div(wsum(d * absw), wsum(d))
  top = 4.0 / 3.0 if spec.scheme == "log" else 1.0
  hi = jnp.maximum(top * jnp.max(absw, axis=axes, keepdims=True), lo)
  out_shape = lo.shape
  ws, ds = _grid_sample(wf, d, layout(spec))
  lo, hi = _group_row(lo, ws.ndim, layout(spec)), _group_row(hi, ws.ndim, layout(spec))
  frac = jnp.linspace(0.0, 1.0, GRID_SIZE, dtype=wf.dtype)
  alpha = hi  # the top of the range, were GRID_LEVELS 0
  for _ in range(GRID_LEVELS):
    ratio = _safe_div(hi, lo)
    cands = lo[None] * jnp.where(ratio > 0, ratio, 1)[None] ** frac.reshape(
        (-1,) + (1,) * ws.ndim)
    # A few candidates per pass: memory stays a small multiple of the leaf's.
    err = jax.lax.map(lambda c: _sample_errors(ws, ds, spec, c),
                      cands.reshape((-1, SUM_OUTPUTS) + cands.shape[1:])).reshape(cands.shape)
    best = jnp.argmin(err, axis=0, keepdims=True)
    pick = lambda k: jnp.take_along_axis(cands, jnp.clip(best + k, 0, GRID_SIZE - 1), 0)[0]
    lo, hi, alpha = pick(-1), pick(1), pick(0)
  return alpha.reshape(out_shape)


def _search(wf, d, spec, alpha0):
  """The best scale near ``alpha0`` on a strided sample of the weights.

  ``SEARCH_LEVELS`` geometric grids of ``SEARCH_CANDIDATES`` scales centred
  on the last best (the first on ``alpha0``, spanning a factor
  ``SEARCH_SPAN`` either way); each next level
  spans one step of the last. The centre is a candidate at every level, so
  the sample's error never rises above ``alpha0``'s. Where ``alpha0`` is
  unusable (not finite or <= 0: the zeros of an abstract init), the search
  starts from the sample's weighted mean ``|w|`` instead (no pass over the
  whole leaf).
  """
  # The barrier materialises the (small, contiguous) sample once, rather than
  # letting every candidate's evaluation gather it from the whole leaf.
  ws, ds = jax.lax.optimization_barrier(_search_sample(wf, d, layout(spec)))
  axes = _reduce_axes(ws.ndim, layout(spec))
  mean_abs = _safe_div(jnp.sum(ds * jnp.abs(ws), axis=axes, keepdims=True),
                       jnp.sum(ds, axis=axes, keepdims=True))
  centre = _group_row(alpha0, ws.ndim, layout(spec))
  centre = jnp.where(jnp.isfinite(centre) & (centre > 0), centre, mean_abs)
  # Level l's candidates are centre * factors[l]: spans of SEARCH_SPAN,
  # then one candidate step of the level before, and so on.
  frac = np.linspace(-1.0, 1.0, SEARCH_CANDIDATES)
  steps = (2.0 / (SEARCH_CANDIDATES - 1)) ** np.arange(SEARCH_LEVELS)
  factors = jnp.asarray(np.exp(np.log(SEARCH_SPAN) * steps[:, None] * frac[None, :]), wf.dtype)
  row = (1,) * centre.ndim

  def level(centre, factor):
    cands = centre[None] * factor.reshape((-1,) + row)
    err = _sample_errors(ws, ds, spec, cands)
    best = jnp.argmin(err, axis=0, keepdims=True)
    return jnp.take_along_axis(cands, best, 0)[0], None

  # A loop over the levels keeps the compiled graph one level long.
  centre, _ = jax.lax.scan(level, centre, factors)
  return centre.reshape(alpha0.shape)


def _round(wf, d, spec, alpha):
  """One alternation round: ``Σ D b w / Σ D b²`` with ``b = code(w / alpha)``
  (one pass; ``alpha`` is kept where a group's codes are all zero)."""
  b = nearest_code(_safe_div(wf, alpha), spec)
  num, den = group_sums((d * b * wf, d * b * b), layout(spec), sum_rows(spec))
  return _lsq_scale(num, den, alpha)


def _lsq_scale(num, den, alpha):
  """``num / den``, or ``alpha`` where every code is zero (``den = 0``); a
  non-finite weight makes it non-finite (the skip of a non-finite step
  relies on that)."""
  return jnp.where(den == 0, alpha + 0 * num, num / jnp.where(den == 0, 1, den))


REFINE_STEP = 0.02   # the parabola's points: alpha e^{-h}, alpha, alpha e^{h}, h = this
REFINE_BITS = 4      # widths from which the warm start refines the search's scale


def _refine(wf, d, spec, alpha):
  """A parabola in ``log alpha`` through the exact errors at three scales
  around ``alpha`` (one pass: three sums in one reduction). Returns its
  minimiser, kept within two steps of ``alpha``, and the best of the three.
  Near the optimum the error is smooth in the scale over many weights, so
  this finds it where the sample cannot: at high widths the optimum depends
  on the few largest weights."""
  h = REFINE_STEP
  cands = (alpha * float(np.exp(-h)), alpha, alpha * float(np.exp(h)))
  e0, e1, e2 = group_sums(
      tuple(d * (wf - c * nearest_code(_safe_div(wf, c), spec)) ** 2 for c in cands),
      layout(spec), sum_rows(spec))
  curv = e0 - 2 * e1 + e2
  shift = jnp.where(curv > 0, 0.5 * h * (e0 - e2) / jnp.where(curv > 0, curv, 1), 0.0)
  best = jnp.where(e0 < jnp.minimum(e1, e2), cands[0], jnp.where(e2 < e1, cands[2], alpha))
  return alpha * jnp.exp(jnp.clip(shift, -2 * h, 2 * h)), best


def _best_round(wf, d, spec, cands):
  """One round from whichever of the scales ``cands`` has the lowest error
  ``E``, in one pass: every round's sums and every error come out of one
  reduction."""
  terms = []
  for alpha in cands:
    b = nearest_code(_safe_div(wf, alpha), spec)
    terms += [d * b * wf, d * b * b, d * (wf - alpha * b) ** 2]
  sums = group_sums(tuple(terms), layout(spec), sum_rows(spec))
  num, den, err = sums[0:3]
  alpha = cands[0]
  for k in range(1, len(cands)):
    better = sums[3 * k + 2] < err
    num, den, err, alpha = (jnp.where(better, new, old) for new, old in zip(
        (sums[3 * k], sums[3 * k + 1], sums[3 * k + 2], cands[k]), (num, den, err, alpha)))
  return _lsq_scale(num, den, alpha)


def warm_fit_cost(shape, spec: QuantSpec) -> float:
  """Weights a training step's (warm) :func:`fit_scale` visits, over the
  leaf's size: the search's candidate evaluations on its sample, then one
  round (below ``REFINE_BITS``), or the three-scale refinement, a read for
  ``max|w|`` and the three-candidate round (from ``REFINE_BITS`` on). Each
  full-size term counts one evaluation per weight; the refinement's three
  errors share one read of ``w`` and ``D``, the last round reads them once
  per candidate. 1 for binary codes (one pass for the closed form).

  Examples:
    >>> import blaq_jax as bq
    >>> bq.warm_fit_cost((256, 256), bq.QuantSpec(1))  # the closed form: one pass
    1.0
    >>> bq.warm_fit_cost((1024, 1024), bq.QuantSpec(2))
    1.5625
  """
  if spec.is_binary:
    return 1.0
  shape = tuple(shape)
  size = int(np.prod(shape))
  if spec.group_size is not None:
    check_group_shape(shape, spec)
    groups = size // spec.group_size
  else:
    groups = shape[-1] if spec.per_channel and shape else 1
  per_group = size // groups
  least = SEARCH_MIN_ROWS if layout(spec) else SEARCH_MIN_SAMPLE
  stride = -(-per_group // max(per_group // SEARCH_FRACTION, least))
  sampled = -(-per_group // stride) * groups
  search = SEARCH_LEVELS * SEARCH_CANDIDATES * sampled / size
  if spec.bits < REFINE_BITS:
    return search + 1.0
  return search + 3.0 + 1.0 + 3.0


@overload
def fit_scale(w: jax.Array, spec: QuantSpec, curvature: jax.Array | None = None,
              scale: jax.Array | None = None, *,
              with_rounds: Literal[False] = False) -> jax.Array: ...


@overload
def fit_scale(w: jax.Array, spec: QuantSpec, curvature: jax.Array | None = None,
              scale: jax.Array | None = None, *,
              with_rounds: Literal[True]) -> tuple[jax.Array, jax.Array]: ...


def fit_scale(w: jax.Array, spec: QuantSpec, curvature: jax.Array | None = None,
              scale: jax.Array | None = None, *,
              with_rounds: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The scale ``alpha`` of the projection ``ŵ = alpha · code(w / alpha)``.

  Two modes, both minimising ``Σ D (w - alpha code(w/alpha))²``:

  * **Cold** (``scale=None``: :func:`quantize`, a transform's ``init``,
    export): the alternation run to its fixed point (``spec.tol``, at most
    ``spec.max_iters`` rounds) from three starts, the best scale of a grid
    search, ``max|w|`` and the weighted mean ``|w|``; each scale group keeps
    the best of the three.
  * **Warm** (``scale`` given: a training step, from the last step's scale):
    a fixed amount of work (see the module docstring): a search on a strided
    sample of the weights (``1/256`` of them, at least 16384 per tensor or
    256 per output channel or group, so all of a group of up to 256)
    over scales within a factor 2 of ``scale``, then one full round below 4
    bits, or a refinement on all the weights and a round from the best of
    three candidates from 4 bits on. No loop runs to a tolerance, so the
    step's cost does not depend on the weights, and the search, not a longer
    alternation, lets ``ŵ`` follow the best fixed point as the weights move
    (benchmarks/README.md gives its error against the alternation run to
    convergence).

  Binary codes have the closed form ``alpha = Σ D|w| / Σ D`` either way.

  Examples:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import blaq_jax as bq
    >>> w = jnp.array([0.2, -0.6, 0.4, -0.8])
    >>> print(bq.fit_scale(w, bq.QuantSpec(1)))  # binary: mean |w|
    [0.5]
    >>> print(np.asarray(bq.fit_scale(w, bq.QuantSpec(2, scheme="ternary"))).round(3))
    [0.6]

  Args:
    w: the latent weights.
    spec: the :class:`QuantSpec`.
    curvature: ``D`` (None for 1).
    scale: a warm start (the previous step's ``alpha``, shape as returned);
      None for a cold start. Non-positive or non-finite entries start from
      ``sum(D|w|) / sum(D)`` instead.
    with_rounds: also return the number of alternation rounds run over all
      the weights (1 for a warm start, 0 for binary codes, the most of the
      three alternations for a cold start).

  Returns:
    ``alpha`` of shape :func:`scale_shape`: the reduced axes kept
    (``(1,..,1)`` or ``(1,..,1,c)``), or with ``group_size=g`` the leaf's
    shape with axis -2 divided by ``g``; float32 for half-precision ``w``,
    else ``w``'s dtype. Group-wise, each group's scale is the one this
    function gives for that group's weights alone, per tensor.
  """
  wf, d = _prepare(w, curvature, "fit_scale")
  if spec.group_size is not None:
    return _fit_groups(wf, d, spec, scale, with_rounds)
  return _fit(wf, d, spec, scale, with_rounds)


def _fit_groups(wf, d, spec, scale, with_rounds):
  """:func:`fit_scale` with group-wise scales: the fit on the grouped view
  ``(..., in // g, g, out)`` (one scale per group of its axis -2), reshaped
  to :func:`scale_shape`."""
  check_group_shape(wf.shape, spec)
  out_shape = scale_shape(wf.shape, spec)
  view = group_view(wf.shape, spec)
  kept = _kept_shape(view, GROUP)
  if scale is not None:
    scale = jnp.broadcast_to(jnp.asarray(scale), out_shape)
    parts = _explicit_spec(scale)
    scale = (scale.reshape(kept) if parts is None else
             jnp.reshape(scale, kept, out_sharding=P(*parts[:-1], None, parts[-1])))
  res = _fit(to_group_view(wf, spec), to_group_view(d, spec), spec, scale, with_rounds)
  if with_rounds:
    return from_group_view(res[0], out_shape), res[1]
  return from_group_view(res, out_shape)


@functools.partial(jax.jit, static_argnums=(2, 4))
def _fit(wf, d, spec, scale, with_rounds):
  """:func:`fit_scale` on prepared ``w`` and ``D`` (in the grouped view for
  group-wise scales). Jitted: called eagerly (``init``, export) it compiles
  once per shape and spec instead of dispatching each operation."""
  axes = _reduce_axes(wf.ndim, layout(spec))

  def wsum(x):
    return jnp.sum(x, axis=axes, keepdims=True)

  if spec.is_binary:
    num, den = group_sums((d * jnp.abs(wf), d), layout(spec))
    alpha = _lsq_scale(num, den, 0)
    return (alpha, jnp.zeros([], jnp.int32)) if with_rounds else alpha

  if scale is not None:
    found = _search(wf, d, spec, jax.lax.stop_gradient(jnp.asarray(scale, wf.dtype)))
    if spec.bits < REFINE_BITS:
      alpha = _round(wf, d, spec, found)
    else:
      fitted, best = _refine(wf, d, spec, found)
      top = jnp.max(jnp.abs(wf), axis=axes, keepdims=True)
      alpha = _best_round(wf, d, spec, (fitted, best, jnp.where(top > 0, top, best)))
    return (alpha, jnp.ones([], jnp.int32)) if with_rounds else alpha

  # Three alternations run to their fixed points, from the grid's best, from
  # max|w| and from the weighted mean |w|; each group keeps the best.
  absw = jnp.abs(wf)
  starts = jnp.stack([_cold_start(wf, d, spec, wsum, axes),
                      jnp.max(absw, axis=axes, keepdims=True),
                      _safe_div(wsum(d * absw), wsum(d))])

  def converge(alpha0):
    def cond(carry):
      i, _, done = carry
      return (i < spec.max_iters) & ~done

    def body(carry):
      i, alpha, _ = carry
      new = _round(wf, d, spec, alpha)
      done = jnp.all(jnp.abs(new - alpha) <= spec.tol * jnp.abs(new))
      return i + 1, new, done

    rounds, alpha, _ = jax.lax.while_loop(
        cond, body, (jnp.zeros([], jnp.int32), alpha0, jnp.array(False)))
    err = wsum(d * (wf - alpha * nearest_code(_safe_div(wf, alpha), spec)) ** 2)
    return alpha, err, rounds

  alphas, errs, rounds = jax.vmap(converge)(starts)
  best = jnp.argmin(errs, axis=0, keepdims=True)
  alpha = jnp.take_along_axis(alphas, best, 0)[0]
  return (alpha, jnp.max(rounds)) if with_rounds else alpha


def codes(w: jax.Array, spec: QuantSpec, alpha: jax.Array) -> jax.Array:
  """``code(w / alpha)``: the code values of ``w`` at scale ``alpha``.

  In the compute dtype (float32 for half-precision ``w``, else ``w``'s).
  """
  w = jnp.asarray(w)
  wf = w.astype(compute_dtype(w.dtype))
  if spec.is_binary:
    return nearest_code(wf, spec)
  alpha = expand_scale(jnp.asarray(alpha, wf.dtype), spec, wf.shape)
  return nearest_code(_safe_div(wf, alpha), spec)


def quantize_with_scale(w: jax.Array, spec: QuantSpec, alpha: jax.Array) -> jax.Array:
  """``ŵ = alpha · code(w / alpha)``: the projection at a given scale (elementwise).

  Computed in the compute dtype and cast to ``w``'s dtype. Called outside
  ``jit`` it runs as one compiled graph per shape and spec, and its product is
  ``alpha · b`` exactly, bit for bit what :func:`blaq_jax.dequantize` of the
  packed leaf gives. Under ``jit`` XLA may fold ``alpha`` into the codes'
  ``1/n`` (``alpha · (k/n) -> k · (alpha/n)``): the same ``ŵ`` up to one
  rounding.

  Examples:
    >>> import jax.numpy as jnp
    >>> import blaq_jax as bq
    >>> w = jnp.array([0.2, -0.6, 0.4, -0.8])
    >>> print(bq.quantize_with_scale(w, bq.QuantSpec(2), jnp.array(0.8)))  # codes {-1, 0, 1}
    [ 0.  -0.8  0.  -0.8]
  """
  w = jnp.asarray(w)
  if checks.is_traced(w, alpha):
    return _scaled_codes(w, spec, alpha, hold=lambda b: b)
  return _eager_quantize_with_scale(w, spec, alpha)


def _scaled_codes(w, spec: QuantSpec, alpha, hold):
  alpha = jnp.asarray(alpha, compute_dtype(w.dtype))
  return (expand_scale(alpha, spec, w.shape) * hold(codes(w, spec, alpha))).astype(w.dtype)


# Eager calls (quantize_params outside jit, init, export, evaluation) run as
# one small compiled graph per shape and spec instead of dispatching, and
# compiling for each new shape, every operation; the barrier keeps the fold
# out of it.
_eager_quantize_with_scale = jax.jit(
    functools.partial(_scaled_codes, hold=jax.lax.optimization_barrier), static_argnums=1)


def solve(w: jax.Array, spec: QuantSpec, curvature: jax.Array | None = None,
          scale: jax.Array | None = None):
  """Solves the weighted projection; returns ``(alpha, b)``.

  ``alpha`` is :func:`fit_scale`'s, ``b`` the code values ``code(w /
  alpha)``, both in the compute dtype (float32 for half-precision ``w``);
  ``ŵ = (alpha * b).astype(w.dtype)`` (a group-wise ``alpha`` repeated
  along axis -2 first, see :func:`expand_scale`).
  """
  alpha = fit_scale(w, spec, curvature, scale)
  return alpha, codes(w, spec, alpha)


def quantize(w: jax.Array, spec: QuantSpec,
             curvature: jax.Array | None = None) -> jax.Array:
  """Returns ``ŵ = alpha · code(w / alpha)``, the loss-aware projection of ``w``.

  A cold start run to the alternation's fixed point (see the module
  docstring); ``D = 1`` if ``curvature`` is None.

  Examples:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import blaq_jax as bq
    >>> w = jnp.array([0.2, -0.6, 0.4, -0.8])
    >>> print(bq.quantize(w, bq.QuantSpec(1)))
    [ 0.5 -0.5  0.5 -0.5]
    >>> print(np.asarray(bq.quantize(w, bq.QuantSpec(2, scheme="ternary"))).round(3))
    [ 0.  -0.6  0.6 -0.6]

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


# The projection of a LAQ/BLAQ state: one scale per quantized leaf, fitted
# cold at init and warm at each step, and the quantized weights at those scales.


def initial_scale(w, spec):
  """The cold-started plain scale; zeros of its shape for abstract params
  (``jax.ShapeDtypeStruct`` leaves, e.g. a restore target): a scale <= 0 is
  replaced by a cold start at the next update."""
  if tree_lib.is_abstract(w):
    return jnp.zeros(scale_shape(w.shape, spec), compute_dtype(w.dtype))
  return fit_scale(w, spec)


def next_scales(spec, params, den, scale):
  """Per quantized leaf, the scale of ``Q_den(params)``: :func:`fit_scale`
  warm-started from ``scale`` (the previous step's); None elsewhere."""
  return spec_lib.map_with_spec(
      lambda s, w, d, a: None if s is None else fit_scale(w, s, d, a),
      spec, params, den, scale)


def project(spec, params, scale):
  """``ŵ``: ``alpha · code(w / alpha)`` per quantized leaf, ``w`` elsewhere."""
  return spec_lib.map_with_spec(
      lambda s, w, a: w if s is None else quantize_with_scale(w, s, a), spec, params, scale)


# The plain (``D = 1``) projection of the STE family, dampening, freezing,
# alpha-blending and the diagnostics, and the index of a code in the codebook.

SCALES = ("fit", "none")


def check_scale(scale, where: str) -> None:
  """Raises a ``ValueError`` naming ``where`` unless ``scale`` is in :data:`SCALES`."""
  if scale not in SCALES:
    raise ValueError(f"{where}: scale must be one of {SCALES}, got {scale!r}")


def scale_and_codes(w: jax.Array, spec: QuantSpec, scale: str = "fit"):
  """Returns ``(alpha, b)`` of the plain projection (``alpha = 1`` if ``scale="none"``)."""
  w = jnp.asarray(w)
  return _plain_codes(w, spec, None if scale == "none" else fit_scale(w, spec))


def _plain_codes(w, spec: QuantSpec, alpha):
  """``(alpha, code(w / alpha))``; ``alpha`` None: ``(1, code(w))`` in ``w``'s dtype."""
  if alpha is None:
    return jnp.ones([], w.dtype), nearest_code(w, spec)
  return alpha, codes(w, spec, alpha)


def plain_quantize(w: jax.Array, spec: QuantSpec, scale: str = "fit") -> jax.Array:
  """``Q(w)`` of the STE family, without a straight-through derivative."""
  alpha, b = scale_and_codes(w, spec, scale)
  return (expand_scale(alpha, spec, jnp.shape(w)) * b).astype(jnp.asarray(w).dtype)


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
  w = jnp.asarray(w)
  alpha = None if scale == "none" else fit_scale(w, spec)
  index = _code_index_at if checks.is_traced(w) else _eager_code_index
  return index(w, spec, alpha)


def _code_index_at(w, spec: QuantSpec, alpha):
  return code_index(_plain_codes(w, spec, alpha)[1], spec)


# Eager (a state's init): one compiled graph per shape after fit_scale's own.
_eager_code_index = jax.jit(_code_index_at, static_argnums=1)
