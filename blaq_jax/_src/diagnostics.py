"""Zig-zag / oscillation diagnostics: an identity transform that measures them.

:func:`track_oscillations` returns the updates unchanged and records, for
every quantized leaf, with ``w_{t+1} = w_t + u_t`` the post-update latent
weights and ``z_t`` the integer codes of their plain (``D = 1``) projection
(:func:`blaq_jax.ste_quantize`'s quantizer)::

    flips      number of (weight, step) pairs with z_{t+1} ≠ z_t, since init
    per window (tumbling windows of ``window`` steps):
      flips of each weight, and their frequency  flips / window
      amplitude of each weight                   max_t w - min_t w  (peak to peak,
                                                 over the window's ``window + 1`` positions)
    cosine     cos(u_t, u_{t-1}) of the leaf's successive updates (and its mean
               over the window); near -1 means zig-zag

These are the quantities of Table 1 of Ma et al. (the amplitude of the latent
weight and the number of flips of its quantized value over a window).
:func:`oscillation_stats` turns the state into a flat dict of scalars. With
bits=1 the codes are ``sign(w)`` whatever the curvature ``D``, so they are
exactly the codes LAQ/BLAQ use; for more bits LAQ/BLAQ's ``Q_D`` may round a
weight near a boundary differently.

Chain it last, so that it sees the final updates::

    tx = optax.chain(bq.blaq(1e-3, spec), bq.track_oscillations(spec))
    ...
    logs = bq.oscillation_stats(opt_state)

Memory: seven arrays of each quantized leaf's shape.

References:
  Ma, Zhou, Ma, Yu & Li, `One-Step Forward and Backtrack: Overcoming Zig-Zagging in
  Loss-Aware Quantization Training <https://doi.org/10.1609/aaai.v38i13.29336>`_,
  AAAI 2024 (Table 1).
  Nagel, Fournarakis, Bondarenko & Blankevoort, `Overcoming Oscillations in
  Quantization-Aware Training <https://arxiv.org/abs/2203.11086>`_, ICML 2022.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from blaq_jax._src import checks
from blaq_jax._src import spec as spec_lib
from blaq_jax._src import tree as tree_lib
from blaq_jax._src.quantizers import check_scale, integer_codes
from blaq_jax._src.skipping import increment
from blaq_jax._src.spec import QuantSpecTree


class OscillationState(NamedTuple):
  """State of :func:`track_oscillations` (per-leaf trees, None if not quantized).

  Attributes:
    count: steps seen.
    window: the window length (a constant, kept for :func:`oscillation_stats`).
    codes: each weight's integer code after the last step.
    flips: total code flips of the leaf since init (float32 scalar).
    window_flips, window_min, window_max, window_cosine: accumulators of the
      current window (per weight; the cosine sum per leaf).
    last_flips, last_amplitude, last_cosine: the same over the last completed
      window (flips and peak-to-peak amplitude per weight, mean cosine).
    prev_updates: the previous update of the leaf.
    cosine: ``cos(u_t, u_{t-1})`` of the last step, per leaf.
    cosine_all: the same over all quantized leaves together.
  """

  count: jax.Array
  window: jax.Array
  codes: Any
  flips: Any
  window_flips: Any
  window_min: Any
  window_max: Any
  window_cosine: Any
  last_flips: Any
  last_amplitude: Any
  last_cosine: Any
  prev_updates: Any
  cosine: Any
  cosine_all: jax.Array


class _LeafStep(NamedTuple):
  """One leaf's results of a step: its entries of the new state (the fields
  of OscillationState that hold one entry per leaf), and the sums the cosine
  over all leaves needs (``dot``, ``norm_u``, ``norm_prev``)."""
  codes: Any
  flips: Any
  window_flips: Any
  window_min: Any
  window_max: Any
  window_cosine: Any
  last_flips: Any
  last_amplitude: Any
  last_cosine: Any
  prev_updates: Any
  cosine: Any
  dot: Any
  norm_u: Any
  norm_prev: Any


# The fields of OscillationState that hold one entry per leaf.
_PER_LEAF = tuple(f for f in OscillationState._fields if f not in ("count", "window", "cosine_all"))
assert _LeafStep._fields == _PER_LEAF + ("dot", "norm_u", "norm_prev")


def _cosine(dot, n1, n2):
  den = jnp.sqrt(n1 * n2)
  return jnp.where(den > 0, dot / jnp.where(den > 0, den, 1), 0.0)


def _is_window(window) -> bool:
  if checks.is_concrete_number(window):
    return checks.is_concrete_number(window, integer=True) and window >= 1
  # A hyperparameter of optax.inject_hyperparams: an integer scalar array.
  return checks.is_array_scalar(window) and jnp.issubdtype(jnp.result_type(window), jnp.integer)


def _copy(w):
  if tree_lib.is_abstract(w):
    return jnp.zeros_like(w)
  return jnp.array(w, copy=True)


def track_oscillations(spec: QuantSpecTree, *, window: int = 100,
                       scale: str = "fit") -> optax.GradientTransformationExtraArgs:
  """Identity on updates; its state records code flips, amplitudes and cosines.

  Flips are counted on the codes of the plain (``D = 1``) projection of the
  post-update weights ``params + updates``.

  Per quantized leaf, with ``w_{t+1} = w_t + u_t`` and ``z_t`` the code
  indices of its plain projection::

      flips      Σ_t Σ_i [z_{t+1,i} ≠ z_{t,i}]             (since init, and per window)
      frequency  window flips / (n · window)
      amplitude  max_t w_{t,i} - min_t w_{t,i}              (per weight, over the window)
      cosine     <u_t, u_{t-1}> / (|u_t| |u_{t-1}|)          (near -1: zig-zag)

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import blaq_jax as bq
    >>> params = {"w": jnp.array([[0.05, -0.6], [0.4, -0.8]])}
    >>> tx = bq.track_oscillations(bq.quant_spec(params, bits=1), window=4)
    >>> state = tx.init(params)
    >>> for u in (-0.1, 0.1, -0.1, 0.1):  # w[0, 0] zig-zags across 0
    ...   updates = {"w": jnp.zeros((2, 2)).at[0, 0].set(u)}
    ...   updates, state = tx.update(updates, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> stats = bq.oscillation_stats(state)
    >>> print(stats["w/window_flips"], stats["w/cosine"])
    4.0 -1.0

  References:
    Ma, Zhou, Ma, Yu & Li, `One-Step Forward and Backtrack: Overcoming Zig-Zagging
    in Loss-Aware Quantization Training
    <https://doi.org/10.1609/aaai.v38i13.29336>`_, AAAI 2024 (Table 1).
    Nagel, Fournarakis, Bondarenko & Blankevoort, `Overcoming Oscillations in
    Quantization-Aware Training <https://arxiv.org/abs/2203.11086>`_, ICML 2022.

  Args:
    spec: the tree from :func:`blaq_jax.quant_spec`.
    window: length (in steps) of the tumbling window for per-weight flip
      counts and amplitudes.
    scale: the STE quantizer's scale used for the codes, ``"fit"`` or
      ``"none"`` (only matters for ``bits >= 2``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
    and ignores extra keyword arguments (``grad_fn`` passes through a chain).
    ``window`` may be a hyperparameter of ``optax.inject_hyperparams`` (an
    integer array). The state never holds the params' own buffers (they can
    be donated with it), its arrays take each param's sharding, and ``init``
    on abstract params (``jax.ShapeDtypeStruct`` leaves) gives the state's
    shapes and dtypes with codes 0 and zero window extremes.
  """
  check_scale(scale, "track_oscillations")
  if not _is_window(window):
    raise ValueError(f"track_oscillations: window must be an int >= 1, got {window!r}")
  spec_lib.check_spec_arg(spec, "track_oscillations")

  def per_leaf(fn, *trees):
    return spec_lib.map_quantized(fn, spec, *trees)

  def init_fn(params):
    tree_lib.check_float_params(params, "track_oscillations.init")
    spec_lib.check_spec_matches(spec, params, "track_oscillations.init")
    zeros_i = lambda s, w: jnp.zeros_like(w, jnp.int32)
    scalar = lambda s, w: jnp.zeros([], jnp.float32)
    if tree_lib.is_params_placeholder(params):
      # optax.tree.map_params: per-leaf scalars are not "like params".
      scalars = jax.tree.map(lambda s: None if s is None else jnp.zeros([], jnp.float32),
                             tree_lib.unwrap(spec), is_leaf=spec_lib.is_spec_leaf)
      per_scalar = lambda: scalars
    else:
      per_scalar = lambda: per_leaf(scalar, params)
    return OscillationState(
        count=jnp.zeros([], jnp.int32),
        window=jnp.asarray(window, jnp.int32),
        codes=per_leaf(lambda s, w: integer_codes(w, s, scale), params),
        flips=per_scalar(),
        window_flips=per_leaf(zeros_i, params),
        # Copies (never the params' own buffers), so that params and an
        # eagerly built state can be donated together.
        window_min=per_leaf(lambda s, w: _copy(w), params),
        window_max=per_leaf(lambda s, w: _copy(w), params),
        window_cosine=per_scalar(),
        last_flips=per_leaf(zeros_i, params),
        last_amplitude=per_leaf(lambda s, w: jnp.zeros_like(w), params),
        last_cosine=per_scalar(),
        prev_updates=per_leaf(lambda s, w: jnp.zeros_like(w), params),
        cosine=per_scalar(),
        cosine_all=jnp.zeros([], jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    checks.require_params("track_oscillations.update", params)
    tree_lib.check_like_params(updates, params, "updates", "track_oscillations.update")
    count = increment(state.count)
    roll = count % window == 0

    def leaf(s, u, w, codes, flips, wflips, wmin, wmax, wcos, lflips, lamp, lcos, prev):
      new_w = (w + u).astype(w.dtype)  # as optax.apply_updates
      new_codes = integer_codes(new_w, s, scale)
      flipped = (new_codes != codes).astype(jnp.int32)
      u32, p32 = u.astype(jnp.float32), prev.astype(jnp.float32)
      # Elementwise products then sums (not vdot: a contraction over an
      # explicitly sharded axis needs an out_sharding).
      dot, nu, np_ = jnp.sum(u32 * p32), jnp.sum(u32 * u32), jnp.sum(p32 * p32)
      cos = _cosine(dot, nu, np_)
      wflips = wflips + flipped
      wmin, wmax = jnp.minimum(wmin, new_w), jnp.maximum(wmax, new_w)
      wcos = wcos + cos
      lflips = jnp.where(roll, wflips, lflips)
      lamp = jnp.where(roll, wmax - wmin, lamp)
      lcos = jnp.where(roll, wcos / window, lcos)
      return _LeafStep(
          codes=new_codes, flips=flips + jnp.sum(flipped).astype(jnp.float32),
          window_flips=jnp.where(roll, 0, wflips), window_min=jnp.where(roll, new_w, wmin),
          window_max=jnp.where(roll, new_w, wmax), window_cosine=jnp.where(roll, 0.0, wcos),
          last_flips=lflips, last_amplitude=lamp, last_cosine=lcos,
          prev_updates=u.astype(prev.dtype), cosine=cos, dot=dot, norm_u=nu, norm_prev=np_)

    step = tree_lib.unzip(per_leaf(
        leaf, updates, params, *(getattr(state, f) for f in _PER_LEAF if f != "cosine")),
        _LeafStep)
    total = lambda tree: sum(jax.tree.leaves(tree), jnp.zeros([], jnp.float32))
    new_state = OscillationState(
        count=count, window=state.window, **{f: getattr(step, f) for f in _PER_LEAF},
        cosine_all=_cosine(total(step.dot), total(step.norm_u), total(step.norm_prev)))
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find_state(opt_state) -> OscillationState:
  found = tree_lib.find_states(opt_state, OscillationState)
  if not found:
    raise ValueError(
        "oscillation_stats: opt_state holds no OscillationState; add "
        "blaq_jax.track_oscillations(spec) to the optimizer chain")
  if len(found) > 1:
    raise ValueError(
        f"oscillation_stats: opt_state holds {len(found)} OscillationStates; pass "
        "the one you mean")
  return found[0]


def oscillation_stats(opt_state) -> dict[str, jax.Array]:
  """Summarises the :func:`track_oscillations` state inside ``opt_state``.

  The window is the last completed one, or the current partial window before
  the first one completes. Returns a flat dict of scalar arrays (works under
  ``jit``; ``jax.device_get`` it for logging), for each quantized leaf
  ``path`` and for all quantized leaves together (``path = "all"``):

  * ``path/flips``: total code flips since init;
  * ``path/window_flips``: code flips in the window;
  * ``path/flip_frequency``: window flips per weight per step;
  * ``path/max_weight_flips``: the most flips of a single weight in the window;
  * ``path/amplitude_max``, ``path/amplitude_mean``: the largest and the mean
    peak-to-peak amplitude of the latent weights over the window;
  * ``path/cosine``: cosine between the last two updates;
  * ``path/cosine_mean``: its mean over the window (per leaf only);

  plus ``window_steps``, the number of steps the window covers.

  References:
    Ma, Zhou, Ma, Yu & Li, `One-Step Forward and Backtrack: Overcoming Zig-Zagging
    in Loss-Aware Quantization Training
    <https://doi.org/10.1609/aaai.v38i13.29336>`_, AAAI 2024 (Table 1).
    Nagel, Fournarakis, Bondarenko & Blankevoort, `Overcoming Oscillations in
    Quantization-Aware Training <https://arxiv.org/abs/2203.11086>`_, ICML 2022.

  Raises:
    ValueError: if ``opt_state`` holds no (or more than one) tracker state.
  """
  st = _find_state(opt_state)
  complete = st.count >= st.window
  steps = jnp.where(complete, st.window, st.count)
  steps_f = jnp.maximum(steps, 1).astype(jnp.float32)

  leaves = jax.tree_util.tree_flatten_with_path(st.codes)[0]
  paths = [tree_lib.path_str(p) for p, _ in leaves]
  get = lambda tree: jax.tree.leaves(tree)
  wf = [jnp.where(complete, l, c) for l, c in zip(get(st.last_flips), get(st.window_flips))]
  amp = [jnp.where(complete, l, mx - mn) for l, mx, mn in
         zip(get(st.last_amplitude), get(st.window_max), get(st.window_min))]
  cmean = [jnp.where(complete, l, c / steps_f) for l, c in
           zip(get(st.last_cosine), get(st.window_cosine))]

  zero = jnp.zeros([], jnp.float32)
  stats = {"window_steps": steps}
  for path, flips, f, a, cos, cm in zip(paths, get(st.flips), wf, amp, get(st.cosine), cmean):
    n = max(f.size, 1)
    stats[f"{path}/flips"] = flips
    stats[f"{path}/window_flips"] = jnp.sum(f).astype(jnp.float32)
    stats[f"{path}/flip_frequency"] = jnp.sum(f) / (n * steps_f)
    stats[f"{path}/max_weight_flips"] = jnp.max(f) if f.size else jnp.zeros([], jnp.int32)
    stats[f"{path}/amplitude_max"] = jnp.max(a).astype(jnp.float32) if a.size else zero
    stats[f"{path}/amplitude_mean"] = jnp.mean(a).astype(jnp.float32) if a.size else zero
    stats[f"{path}/cosine"] = cos
    stats[f"{path}/cosine_mean"] = cm
  n_all = sum(f.size for f in wf)
  stats["all/flips"] = sum(get(st.flips), zero)
  stats["all/window_flips"] = sum((jnp.sum(f).astype(jnp.float32) for f in wf), zero)
  stats["all/flip_frequency"] = stats["all/window_flips"] / (max(n_all, 1) * steps_f)
  stats["all/max_weight_flips"] = jnp.max(jnp.stack(
      [jnp.zeros([], jnp.int32)] + [jnp.max(f) for f in wf if f.size]))
  stats["all/amplitude_max"] = jnp.max(jnp.stack(
      [zero] + [jnp.max(a).astype(jnp.float32) for a in amp if a.size]))
  stats["all/amplitude_mean"] = (
      sum((jnp.sum(a).astype(jnp.float32) for a in amp), zero) / max(n_all, 1))
  stats["all/cosine"] = st.cosine_all
  return stats
