"""LAQ: loss-aware weight quantization trained with Adam."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from blaq_jax._src import checks
from blaq_jax._src import loss_aware
from blaq_jax._src import tree as tree_lib
from blaq_jax._src.quantizers import next_scales
from blaq_jax._src.skipping import counted, latent_check_needed, select, skip_if_nonfinite, step_ok
from blaq_jax._src.spec import QuantSpecTree


class LAQState(NamedTuple):
  """State of :func:`laq`.

  Attributes:
    count: number of applied (finite) steps.
    mu: Adam first moment.
    nu: Adam second moment; the curvature ``D = sqrt(nu / (1 - b2^count)) +
      eps`` is computed from it where it is needed (:func:`blaq_jax.curvature`),
      not stored.
    scale: per quantized leaf the scale ``alpha`` of ``ŵ = Q_D(w)`` for the
      current params (None elsewhere); what the forward pass quantizes with.
    skipped: number of steps skipped for non-finite gradients (or latent
      weights a step would have made non-finite).
    b2, eps: Adam's constants (scalars), for :func:`blaq_jax.curvature`.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  scale: Any
  skipped: jax.Array
  b2: jax.Array
  eps: jax.Array


def laq_step(spec, hyper: loss_aware.Hyper, state, g, params, lr, ok):
  """One LAQ step, applied if ``ok`` (a scalar bool; None: always).

  Returns ``(updates, new_state)`` of ``state``'s type; a state with a
  ``curvature`` field (BLAQ's) gets ``D`` stored there. Shared by :func:`laq`
  and the steps of :func:`blaq_jax.blaq` that skip the lookahead, so that
  both run the same operations. A skipped step selects the old values
  leafwise (one fused pass, no ``lax.cond``), so it is exact. With ``ok``
  given, a step whose new latent weights are not finite is skipped too.
  """
  count, skipped = counted(ok, state.count, state.skipped)
  mu = select(ok, loss_aware.moment(state.mu, g, hyper.b1), state.mu)
  nu = select(ok, loss_aware.second_moment(state.nu, g, hyper.b2), state.nu)
  den = loss_aware.denominator(nu, count, hyper.b2, hyper.eps)
  new_params = select(
      ok, loss_aware.step_latent(spec, params, mu, den, count, lr, hyper.b1, hyper.clip), params)
  applied, fit_den = loss_aware.fit_inputs(spec, loss_aware.as_applied(new_params, params), nu,
                                           count, hyper)
  extra = {}
  if "curvature" in state._fields:
    # A state that keeps D: the fit reads the buffer D is stored in.
    fit_den = extra["curvature"] = select(ok, fit_den, state.curvature)
  scale = select(ok, next_scales(spec, applied, fit_den, state.scale), state.scale)
  new_state = state._replace(count=count, mu=mu, nu=nu, scale=scale, skipped=skipped, **extra)
  new_params, new_state = skip_if_nonfinite(ok, new_params, params, new_state, state, spec,
                                            latent_check_needed(hyper.eps))
  return loss_aware.updates_from(new_params, params), new_state


def laq(
    learning_rate: optax.ScalarOrSchedule,
    spec: QuantSpecTree,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip: float | None = 1.0,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Loss-aware quantization (LAQ) as an optax transform.

  One step, for a quantized leaf, where ``ŵ_t = Q_{D_t}(w_t)`` is what the
  caller's forward/backward pass used::

      g_t     = ∇ℓ(ŵ_t)                                   (given as ``updates``)
      m, v    ← b1 m + (1-b1) g_t,  b2 v + (1-b2) g_t²
      D_{t+1} = sqrt(v / (1 - b2^t)) + eps
      w_{t+1} = clip(w_t - lr · (m / (1 - b1^t)) / D_{t+1}, -c, c)
      α_{t+1} ≈ argmin_α Σ D (w_{t+1} - α code(w_{t+1} / α))², from α_t:
                a search near α_t, then the round α ← Σ D b w / Σ D b²
                of Algorithm 2 (see blaq_jax.fit_scale)
      ŵ_{t+1} = α_{t+1} · code(w_{t+1} / α_{t+1})

  ``D`` is Adam's denominator, the diagonal curvature estimate of the
  proximal Newton derivation. ``w_{t+1}`` in the scale's fit is the
  caller's ``optax.apply_updates(w_t, updates)`` (which can differ from the
  clipped step by a rounding), so the scale fits the weights the next
  forward pass quantizes, and under ``jit`` the fit reads the buffer that
  ``apply_updates`` writes. The state keeps ``α_{t+1}`` (``state.scale``),
  so the next forward pass gets exactly the ``ŵ_{t+1}`` the update assumed
  with ``quantize_params(params, spec, state=state)``, and the projection is
  warm-started as the paper's Algorithm 2 and the LAQ reference code do, at
  a fixed cost per step (:func:`blaq_jax.fit_scale`; benchmarks/README.md
  gives its error and cost). At init ``D = 1`` and ``α``
  is the cold-started plain projection. The state holds ``m, v`` and the
  scales, not ``D``: the update computes ``D`` from ``v`` where it needs it,
  so the state is Adam's plus one scale per quantized tensor (or channel).
  Leaves whose spec is None take the same Adam step without clipping. Steps
  whose gradient or learning rate is not finite (or the rate negative), or
  whose new latent weights are not finite, are skipped: params, moments,
  scales and the step count stay, ``skipped`` grows by 1; the skip is a
  select inside the fused update, not a branch. New latent weights can be
  non-finite with finite inputs only if ``eps`` is 0, so they are checked
  only when ``eps`` is not a positive constant (that check costs a pass).
  (optax's own answer is the wrapper ``optax.apply_if_finite``; this
  transform does it itself, so that a skipped step also leaves the
  quantization state alone.)

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count (its
      value at step 0 is checked; a traced value under
      ``optax.inject_hyperparams`` is not, see :mod:`blaq_jax._src.checks`).
    spec: the tree from :func:`blaq_jax.quant_spec` (QuantSpec or None per leaf).
    b1, b2, eps: Adam's decay rates and epsilon.
    clip: the latent weights of quantized leaves are clipped to ``[-clip,
      clip]`` (None disables).
    skip_nonfinite: skip (and count) steps whose gradient is not finite. Set
      False to drop the check where gradients are known to be finite: it is
      a reduction the whole update waits for (see benchmarks/README.md).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
    and ignores extra keyword arguments. The gradient passed to ``update`` must
    be taken at ``quantize_params(params, spec, state=state)``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import optax
    >>> import blaq_jax as bq
    >>> params = {"w": jnp.array([[0.3, -0.6], [0.9, -0.2]]), "b": jnp.zeros(2)}
    >>> spec = bq.quant_spec(params, bits=1)  # binary kernel, full-precision bias
    >>> tx = bq.laq(learning_rate=0.1, spec=spec)
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum((p["w"] - 0.5) ** 2) + jnp.sum((p["b"] - 0.1) ** 2)
    >>> for _ in range(5):
    ...   w_hat = bq.quantize_params(params, spec, state=state)  # what the model runs
    ...   updates, state = tx.update(jax.grad(loss)(w_hat), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(np.asarray(bq.quantize_params(params, spec, state=state)["w"]).round(3))
    [[ 0.306 -0.306]
     [ 0.306  0.306]]

  References:
    Hou, Yao & Kwok, `Loss-aware Binarization of Deep Networks
    <https://arxiv.org/abs/1611.01600>`_, ICLR 2017.
    Hou & Kwok, `Loss-aware Weight Quantization of Deep Networks
    <https://arxiv.org/abs/1802.08635>`_, ICLR 2018.
  """
  checks.learning_rate("laq", learning_rate)
  loss_aware.check_hyperparams("laq", b1, b2, eps, clip)
  checks.boolean("laq", "skip_nonfinite", skip_nonfinite)
  hyper = loss_aware.Hyper(b1, b2, eps, clip)

  def init_fn(params):
    return loss_aware.init_state(LAQState, params, spec, "laq.init",
                                 b2=loss_aware.as_float(b2), eps=loss_aware.as_float(eps))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    checks.require_params("laq.update", params)
    tree_lib.check_like_params(updates, params, "updates", "laq.update")
    lr = loss_aware.learning_rate_at(learning_rate, state.count)
    ok = step_ok(updates, lr, skip_nonfinite)
    updates, new_state = laq_step(spec, hyper, state, updates, params, lr, ok)
    return updates, new_state._replace(b2=loss_aware.as_float(b2), eps=loss_aware.as_float(eps))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
