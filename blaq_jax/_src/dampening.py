"""Oscillation dampening: a regulariser that pulls weights to their grid point.

Adds to the gradient of every quantized leaf the gradient of

    λ(t) · || sg(Q(w)) - w ||²      i.e.   g ← g + 2 λ(t) (w - Q(w))

where ``Q`` is the plain STE quantizer of the leaf (see
:func:`blaq_jax.ste_quantize`) and ``sg`` stops the gradient, so only the
latent weight is pulled toward its quantized value; leaves whose spec is None
are untouched. ``λ`` may be a schedule of the step count (Nagel et al. anneal
it, e.g. ``optax.cosine_decay_schedule`` reversed). Put it before the
optimizer, like ``optax.add_decayed_weights``::

    tx = bq.ste(optax.chain(bq.add_oscillation_dampening(1e-3, spec),
                            optax.adam(1e-3)), spec)

References:
  Nagel, Fournarakis, Bondarenko & Blankevoort, `Overcoming Oscillations in
  Quantization-Aware Training <https://arxiv.org/abs/2203.11086>`_, ICML 2022.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from blaq_jax._src import checks
from blaq_jax._src import spec as spec_lib
from blaq_jax._src import tree as tree_lib
from blaq_jax._src.quantizers import check_scale, plain_quantize
from blaq_jax._src.skipping import increment
from blaq_jax._src.spec import QuantSpecTree


class DampeningState(NamedTuple):
  """State of :func:`add_oscillation_dampening`: the step count for ``λ(t)``."""

  count: jax.Array


def add_oscillation_dampening(
    weight: optax.ScalarOrSchedule,
    spec: QuantSpecTree,
    *,
    scale: str = "fit",
) -> optax.GradientTransformationExtraArgs:
  """Adds ``2 λ(t) (w - Q(w))`` to the updates of quantized leaves.

  For a quantized leaf, with ``Q`` the plain (``D = 1``) projection and ``sg``
  a stop-gradient, it adds the gradient of ``λ(t) · ||sg(Q(w)) - w||²``::

      g_t ← g_t + 2 λ(t) (w_t - Q(w_t))

  Put it before the optimizer, as ``optax.add_decayed_weights``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import optax
    >>> import blaq_jax as bq
    >>> params = {"w": jnp.array([[0.2, -0.6], [0.4, -0.8]])}
    >>> spec = bq.quant_spec(params, bits=1)
    >>> tx = optax.chain(bq.add_oscillation_dampening(0.1, spec), optax.sgd(1.0))
    >>> zeros = jax.tree.map(jnp.zeros_like, params)
    >>> updates, _ = tx.update(zeros, tx.init(params), params)
    >>> print(np.asarray(updates["w"]).round(3))  # -2 λ (w - Q(w)): towards Q(w) = ±0.5
    [[0.06 0.02]
     [0.02 0.06]]

  References:
    Nagel, Fournarakis, Bondarenko & Blankevoort, `Overcoming Oscillations in
    Quantization-Aware Training <https://arxiv.org/abs/2203.11086>`_, ICML 2022.

  Args:
    weight: ``λ``, a float ``>= 0`` or a schedule of the step count (or a
      hyperparameter of ``optax.inject_hyperparams``).
    spec: the tree from :func:`blaq_jax.quant_spec`.
    scale: the STE quantizer's scale, ``"fit"`` or ``"none"`` (see
      :func:`blaq_jax.ste_quantize`); use the one of the forward pass.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.
  """
  check_scale(scale, "add_oscillation_dampening")
  checks.scalar_or_schedule("add_oscillation_dampening", "weight", weight, lo=0.0)
  spec_lib.check_spec_arg(spec, "add_oscillation_dampening")

  def init_fn(params):
    spec_lib.check_spec_matches(spec, params, "add_oscillation_dampening.init")
    return DampeningState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    checks.require_params("add_oscillation_dampening.update", params)
    tree_lib.check_like_params(updates, params, "updates", "add_oscillation_dampening.update")
    lam = weight(state.count) if callable(weight) else weight

    def add(s, g, w):
      if s is None:
        return g
      q = jax.lax.stop_gradient(plain_quantize(w, s, scale))
      return (g + 2 * lam * (w - q)).astype(g.dtype)

    updates = spec_lib.map_with_spec(add, spec, updates, params)
    return updates, DampeningState(count=increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
