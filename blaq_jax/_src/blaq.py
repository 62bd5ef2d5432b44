"""BLAQ: loss-aware quantization with a one-step forward and backtrack.

One step (Ma et al. 2024, Eq. 4-10), for a quantized leaf, with ``ŵ_t =
Q_{D_t}(w_t)`` the weights the caller's gradient ``g_t = ∇ℓ(ŵ_t)`` was taken
at (``D_t = curvature(state)``):

Stage 1, one step forward (nothing committed)::

    m1, v1 = b1 m + (1-b1) g_t,  b2 v + (1-b2) g_t²
    D1     = sqrt(v1 / (1 - b2^t)) + eps
    w*     = clip(w_t - lr · (m1 / (1 - b1^t)) / D1)                 (Eq. 6)
    ŵ*     = Q_{D1}(w*)                                             (Eq. 5)
    g*     = grad_fn(params with ŵ*)            (same batch; pmean-ed over
                                                 ``batch_axis_name`` if set)

Stage 2, backtrack from ``w_t``::

    g_mix   = a g_t + (1-a) g*                                      (Eq. 9)
    v*      = b2 v + (1-b2) g*²;   D* = sqrt(v* / (1 - b2^t)) + eps
    D_mix   = a D1 + (1-a) D*                                       (Eq. 10)
    m       ← b1 m + (1-b1) g_mix        (computed as a m1 + (1-a) m*)
    v       ← a v1 + (1-a) v*
    w_{t+1} = clip(w_t - lr · (m / (1 - b1^t)) / D_mix)            (Eq. 8)

and the next forward pass uses ``ŵ_{t+1} = Q_{D_mix}(w_{t+1})`` (Eq. 7), i.e.
``curvature(state) = D_mix``. Leaves whose spec is None take the same step at
full precision (their trial value is ``w*`` itself, and they are not clipped).

Choices where the paper is silent: ``v*`` and ``D*`` are taken from the
pre-step moment ``v`` (both stage-1 quantities are "one step from ``w_t``");
the committed second moment mixes the stored ``v1`` and ``v*`` with the same
``a`` as Eq. 10. Every mix is ``a x + (1-a) y`` of quantities LAQ computes the
same way, so ``a = 1`` reproduces LAQ's trajectory bit for bit (``grad_fn`` is
still called). A step whose ``g_t`` or ``g*`` is not finite is skipped
(params, moments and count stay; ``skipped`` grows by 1).

Cost: two gradient evaluations per step (the caller's and ``grad_fn``'s) and
two projections; the rest is elementwise.

References:
  Ma, Zhou, Ma, Yu & Li, "One-Step Forward and Backtrack: Overcoming
  Zig-Zagging in Loss-Aware Quantization Training", AAAI 2024.
  Hou, Yao & Kwok, "Loss-aware Binarization of Deep Networks", ICLR 2017.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Optional

import jax
import optax

from blaq_jax._src import adam_core as core
from blaq_jax._src import tree as tree_lib
from blaq_jax._src.quantizers import quantize


class BLAQState(NamedTuple):
  """State of :func:`blaq` (same fields as :class:`blaq_jax.LAQState`).

  Attributes:
    count: number of applied (finite) steps.
    mu: first moment of the mixed gradient ``g_mix``.
    nu: second moment, ``a v1 + (1-a) v*``.
    curvature: ``D_mix`` (Eq. 10) for quantized leaves, None elsewhere.
    skipped: number of steps skipped for non-finite gradients.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  curvature: Any
  skipped: jax.Array


def blaq(
    learning_rate: optax.ScalarOrSchedule,
    spec,
    *,
    a: float = 0.6,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip: Optional[float] = 1.0,
    batch_axis_name: Optional[str] = None,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """BLAQ as an optax transform.

  Args:
    learning_rate: a float or an optax schedule of the step count.
    spec: the tree from :func:`blaq_jax.quant_spec`.
    a: weight of the current gradient in Eq. 9-10, in [0, 1]; ``a = 1`` is
      LAQ. The paper uses 0.6 on small data sets and 0.9 on ImageNet.
    b1, b2, eps: Adam's decay rates and epsilon.
    clip: latent weights of quantized leaves are clipped to ``[-clip, clip]``.
    batch_axis_name: under ``pmap``/``shard_map``, the axis over which the
      lookahead gradient is ``pmean``-ed (as ``optax.contrib.sam`` does). The
      caller averages ``g_t`` itself, as for any optax optimizer.
    skip_nonfinite: skip (and count) steps where ``g_t`` or ``g*`` is not
      finite; False drops the check (see :func:`blaq_jax.laq`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state,
    params, *, grad_fn)`` calls ``grad_fn`` exactly once. ``grad_fn(p)``
    returns the gradient of the loss on the current batch at parameters ``p``
    (a tree like ``params``), e.g. ``lambda p: jax.grad(loss)(p, batch)``.
    In ``optax.chain`` only the caller's gradient passes through the earlier
    transforms; ``g*`` comes straight from ``grad_fn``.
  """
  if isinstance(a, numbers.Real) and not isinstance(a, bool) and not 0 <= a <= 1:
    raise ValueError(f"blaq: a must be in [0, 1], got {a}")
  core.check_hyperparams("blaq", b1, b2, eps, clip)

  def init_fn(params):
    return core.init_state(BLAQState, params, spec, "blaq.init")

  def update_fn(updates, state, params=None, *, grad_fn: Optional[Callable] = None,
                **extra_args):
    del extra_args
    if params is None:
      raise ValueError("blaq.update: params are required (pass params=...)")
    if grad_fn is None or not callable(grad_fn):
      raise ValueError(
          "blaq.update: the keyword argument grad_fn is required: a function "
          "params -> gradient of the loss on the current batch, e.g. "
          "grad_fn=lambda p: jax.grad(loss)(p, batch)")
    core.check_not_masked(params, "blaq.update")
    count = optax.safe_increment(state.count)
    lr = core.learning_rate_at(learning_rate, state.count)
    hyper = Hyper(b1, b2, eps, clip)
    stage1 = forward_step(spec, hyper, state, updates, params, lr, count)
    g_trial = grad_fn(stage1.trial)
    if batch_axis_name is not None:
      g_trial = jax.lax.pmean(g_trial, axis_name=batch_axis_name)
    ok = core.all_finite(updates, g_trial) if skip_nonfinite else None
    return core.step_or_skip(
        ok, lambda: backtrack(spec, hyper, state, params, stage1, g_trial, a, lr, count),
        state, params, updates)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class Hyper(NamedTuple):
  b1: Any
  b2: Any
  eps: Any
  clip: Any


class ForwardStep(NamedTuple):
  """Stage 1 of BLAQ: moments with ``g_t`` and the trial weights ``ŵ*``."""
  mu: Any
  nu: Any
  den: Any
  trial: Any


def forward_step(spec, hyper: Hyper, state, g, params, lr, count) -> ForwardStep:
  """Eq. 5-6: one Adam/LAQ step from ``w_t``, quantized with ``D1`` (not committed)."""
  mu1 = core.moment(state.mu, g, hyper.b1)
  nu1 = core.second_moment(state.nu, g, hyper.b2)
  den1 = core.denominator(nu1, count, hyper.b2, hyper.eps)
  w_trial = core.step_latent(spec, params, mu1, den1, count, lr, hyper.b1, hyper.clip)
  trial = tree_lib.map_with_spec(
      lambda s, w, d: w if s is None else quantize(w, s, d), spec, w_trial, den1)
  return ForwardStep(mu1, nu1, den1, trial)


def backtrack(spec, hyper: Hyper, state, params, stage1: ForwardStep, g_trial, a, lr,
              count):
  """Eq. 8-10: the step from ``w_t`` with the mixed gradient and curvature.

  Returns ``(new_params, new_state)``; ``new_state`` keeps ``state``'s type and
  ``skipped`` field and replaces ``count, mu, nu, curvature``.
  """
  b1, b2 = hyper.b1, hyper.b2
  # b1 m + (1-b1) g_mix is linear in g_mix, so it equals a m1 + (1-a) m*;
  # mixing the moments (not the gradients) keeps a = 1 bit-exact with LAQ.
  mu = core.mix(a, stage1.mu, core.moment(state.mu, g_trial, b1))
  nu_trial = core.second_moment(state.nu, g_trial, b2)
  nu = core.mix(a, stage1.nu, nu_trial)
  den_mix = core.mix(a, stage1.den, core.denominator(nu_trial, count, b2, hyper.eps))
  new_params = core.step_latent(spec, params, mu, den_mix, count, lr, b1, hyper.clip)
  new_state = state._replace(count=count, mu=mu, nu=nu,
                             curvature=core.quantized_curvature(spec, den_mix))
  return new_params, new_state

