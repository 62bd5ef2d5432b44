"""Iterative weight freezing: stop the weights that keep oscillating.

For every weight of a quantized leaf, with ``z_t`` its integer code (the index
of its code under the plain STE quantizer ``Q``, see
:func:`blaq_jax.ste_quantize`) after step ``t``::

    o_t = 1  if z_t ≠ z_{t-1} and sign(z_t - z_{t-1}) = -(direction of the
             weight's previous code change), else 0       (an oscillation)
    f_t = (1 - m) f_{t-1} + m o_t                          (EMA, m = momentum)

A weight whose ``f_t > threshold(t)`` is frozen at its code: its latent value
is set to ``Q(w)`` (the centre of its code cell) in that step, and every later
update of it is zero, so its latent value no longer moves and its code stays
put. A frozen weight stays frozen. Leaves whose spec is None pass through.

The transform edits updates, so it goes AFTER the optimizer (and after the
STE clipping, if any)::

    tx = optax.chain(bq.ste(optax.adam(1e-3), spec),
                     bq.freeze_oscillations(0.02, spec))

It also chains after :func:`blaq_jax.laq` / :func:`blaq_jax.blaq`; the codes
are always those of the plain (``D = 1``) projection, which for ``bits=1``
are the signs that LAQ/BLAQ's ``Q_D`` uses too.

With a fitted per-tensor scale (``scale="fit"``, ``bits >= 2``) the scale is
still refitted every step from all weights of the tensor, so a frozen
weight's quantized value ``alpha · b`` follows ``alpha``; its code ``b`` stays
while ``alpha`` moves less than half a code step. With ``bits=1`` or
``scale="none"`` the code depends on the frozen latent value alone.

References:
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
from blaq_jax._src.quantizers import check_scale, integer_codes, plain_quantize
from blaq_jax._src.skipping import increment
from blaq_jax._src.spec import QuantSpecTree


class FreezingState(NamedTuple):
  """State of :func:`freeze_oscillations` (per-leaf trees, None if not quantized).

  Attributes:
    count: the step count (argument of a ``threshold`` schedule).
    codes: each weight's integer code after the last step.
    direction: sign (-1, 0, +1) of each weight's last code change.
    frequency: EMA of each weight's oscillations.
    frozen: boolean mask of the frozen weights.
  """

  count: jax.Array
  codes: Any
  direction: Any
  frequency: Any
  frozen: Any


class _LeafStep(NamedTuple):
  """One leaf's results of a step: its update and its new state entries."""

  update: Any
  codes: Any
  direction: Any
  frequency: Any
  frozen: Any


def freeze_oscillations(
    threshold: optax.ScalarOrSchedule,
    spec: QuantSpecTree,
    *,
    momentum: float = 0.01,
    scale: str = "fit",
) -> optax.GradientTransformationExtraArgs:
  """Freezes weights whose oscillation frequency (EMA) exceeds ``threshold(t)``.

  For every weight of a quantized leaf, with ``z_t`` the index of its code
  under the plain projection ``Q`` after step ``t``::

      o_t = [z_t ≠ z_{t-1} and sign(z_t - z_{t-1}) = -(sign of its previous change)]
      f_t = (1 - m) f_{t-1} + m o_t                       (m = momentum)
      if f_t > threshold(t):  w ← Q(w), and every later update of w is 0

  Chain it after the optimizer (and after :func:`blaq_jax.ste`'s clipping).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import blaq_jax as bq
    >>> params = {"w": jnp.array([[0.05, -0.6], [0.4, -0.8]])}
    >>> tx = bq.freeze_oscillations(0.3, bq.quant_spec(params, bits=1), momentum=0.5)
    >>> state = tx.init(params)
    >>> for u in (-0.1, 0.1):  # w[0, 0] flips sign, then flips back: an oscillation
    ...   updates = {"w": jnp.zeros((2, 2)).at[0, 0].set(u)}
    ...   updates, state = tx.update(updates, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(state.frozen["w"])
    [[ True False]
     [False False]]

  References:
    Nagel, Fournarakis, Bondarenko & Blankevoort, `Overcoming Oscillations in
    Quantization-Aware Training <https://arxiv.org/abs/2203.11086>`_, ICML 2022.

  Args:
    threshold: a finite float ``>= 0`` or a schedule of the step count
      (checked at step 0); weights with ``frequency > threshold`` freeze (a
      threshold ``>= 1`` freezes nothing).
    spec: the tree from :func:`blaq_jax.quant_spec`.
    momentum: ``m`` of the frequency EMA, in ``(0, 1]``.
    scale: the STE quantizer's scale, ``"fit"`` or ``"none"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
    and returns updates that keep frozen weights in place. ``threshold`` and
    ``momentum`` may be hyperparameters of ``optax.inject_hyperparams``. The
    state arrays take each param's sharding. ``init`` on abstract params
    (``jax.ShapeDtypeStruct`` leaves, e.g. to build a restore target) gives
    the state's shapes and dtypes with codes 0; initialise from the real
    params (or restore a checkpoint) to train.
  """
  check_scale(scale, "freeze_oscillations")
  if not checks.is_number(momentum) or (
      checks.is_concrete_number(momentum) and not 0 < momentum <= 1):
    raise ValueError(f"freeze_oscillations: momentum must be in (0, 1], got {momentum!r}")
  checks.scalar_or_schedule("freeze_oscillations", "threshold", threshold, lo=0.0)
  spec_lib.check_spec_arg(spec, "freeze_oscillations")

  def per_leaf(fn, *trees):
    return spec_lib.map_quantized(fn, spec, *trees)

  def init_fn(params):
    tree_lib.check_float_params(params, "freeze_oscillations.init")
    spec_lib.check_spec_matches(spec, params, "freeze_oscillations.init")
    return FreezingState(
        count=jnp.zeros([], jnp.int32),
        codes=per_leaf(lambda s, w: integer_codes(w, s, scale), params),
        direction=per_leaf(lambda s, w: jnp.zeros_like(w, jnp.int32), params),
        frequency=per_leaf(lambda s, w: jnp.zeros_like(w, jnp.float32), params),
        frozen=per_leaf(lambda s, w: jnp.zeros_like(w, bool), params))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    checks.require_params("freeze_oscillations.update", params)
    tree_lib.check_like_params(updates, params, "updates", "freeze_oscillations.update")
    thr = threshold(state.count) if callable(threshold) else threshold

    def leaf(s, u, w, codes, direction, freq, frozen):
      if s is None:
        return _LeafStep(u, None, None, None, None)
      new_w = jnp.where(frozen, w, (w + u).astype(w.dtype))  # as optax.apply_updates
      new_codes = integer_codes(new_w, s, scale)
      step = jnp.sign(new_codes - codes)
      oscillated = (step != 0) & (step == -direction)
      direction = jnp.where(step != 0, step, direction)
      freq = freq + (momentum * (oscillated.astype(freq.dtype) - freq)).astype(freq.dtype)
      newly = (freq > thr) & ~frozen
      new_w = jnp.where(newly, plain_quantize(new_w, s, scale), new_w)
      return _LeafStep((new_w - w).astype(u.dtype), new_codes, direction, freq, frozen | newly)

    out = spec_lib.map_with_spec(leaf, spec, tree_lib.unwrap(updates),
                                 tree_lib.unwrap(params), state.codes,
                                 state.direction, state.frequency, state.frozen)
    step = tree_lib.unzip(out, _LeafStep)
    new_state = FreezingState(increment(state.count), step.codes, step.direction,
                              step.frequency, step.frozen)
    return tree_lib.rewrap(updates, step.update), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
