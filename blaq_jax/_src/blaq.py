"""BLAQ: loss-aware quantization with a one-step forward and backtrack."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blaq_jax._src import checks
from blaq_jax._src import loss_aware
from blaq_jax._src import spec as spec_lib
from blaq_jax._src import tree as tree_lib
from blaq_jax._src.laq import laq_step
from blaq_jax._src.quantizers import fit_scale, next_scales, quantize_with_scale
from blaq_jax._src.skipping import (all_finite, counted, increment, latent_check_needed, select,
                                    skip_if_nonfinite, step_ok)
from blaq_jax._src.spec import QuantSpecTree


# ``grad_fn(params) -> grads``: the gradient of the loss on the current batch
# at ``params``, a tree like params (e.g. ``lambda p: jax.grad(loss)(p, batch)``).
GradFn: TypeAlias = Callable[[optax.Params], optax.Updates]


class BLAQState(NamedTuple):
  """State of :func:`blaq`.

  :class:`blaq_jax.LAQState`'s ``count``, ``mu``, ``nu``, ``scale`` and
  ``skipped``, plus ``curvature``: BLAQ stores ``D_mix``, which its second
  moment does not determine, and so keeps no ``b2`` and ``eps`` to recompute
  ``D`` from (LAQ's extra fields).

  Attributes:
    count: number of applied (finite) steps.
    mu: first moment of the mixed gradient ``g_mix``.
    nu: second moment, ``a v1 + (1-a) v*``.
    curvature: ``D_mix`` (Eq. 10) for quantized leaves, None elsewhere.
    scale: per quantized leaf the scale of ``ŵ = Q_{D_mix}(w)`` (Eq. 7) for
      the current params, None elsewhere.
    skipped: number of steps skipped for non-finite gradients (or latent
      weights a step would have made non-finite).
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  curvature: Any
  scale: Any
  skipped: jax.Array


def periodic_lookahead(m: int, steps_per_epoch: int = 1, *,
                       phase: int | None = None) -> Callable[[jax.Array], jax.Array]:
  """The BLAQ paper's schedule: one epoch of two-stage updates in every ``m``.

  The appendix of Ma et al. (2024) runs the forward-and-backtrack "after
  every 5 epochs" (ImageNet: 10) and plain LAQ in the other epochs; ``m`` is
  that period, not a number of solver rounds. It does not say which epoch of
  each period is the BLAQ one; ``phase`` picks it (0-based, ``0 <= phase <
  m``), by default ``m - 1``, the last epoch of each period ("after every
  ``m`` epochs"). With ``steps_per_epoch=1`` the schedule is "every ``m``-th
  step" (steps ``phase, phase + m, ...``).

  Examples:
    >>> import blaq_jax as bq
    >>> lookahead = bq.periodic_lookahead(3)  # every 3rd step
    >>> [bool(lookahead(step)) for step in range(7)]
    [False, False, True, False, False, True, False]
    >>> lookahead = bq.periodic_lookahead(2, steps_per_epoch=3)  # every 2nd epoch
    >>> [bool(lookahead(step)) for step in range(12)]
    [False, False, False, True, True, True, False, False, False, True, True, True]

  Args:
    m: the period in epochs (an int >= 1; ``m = 1`` is every step).
    steps_per_epoch: optimizer steps per epoch (an int >= 1).
    phase: which epoch of each period runs the two-stage update.

  Returns:
    ``schedule(count) -> bool``, for ``blaq(..., lookahead_schedule=...)``;
    ``count`` is the number of applied steps before this one.
  """
  for name, val in (("m", m), ("steps_per_epoch", steps_per_epoch)):
    if not checks.is_concrete_number(val, integer=True) or val < 1:
      raise ValueError(f"periodic_lookahead: {name} must be an int >= 1, got {val!r}")
  if phase is None:
    phase = m - 1
  if not checks.is_concrete_number(phase, integer=True) or not 0 <= phase < m:
    raise ValueError(f"periodic_lookahead: phase must be an int in [0, {m}), got {phase!r}")

  def schedule(count):
    return (count // steps_per_epoch) % m == phase

  return schedule


def blaq(
    learning_rate: optax.ScalarOrSchedule,
    spec: QuantSpecTree,
    *,
    a: float = 0.6,
    lookahead_schedule: Callable[[jax.Array], Any] | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip: float | None = 1.0,
    batch_axis_name: str | None = None,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""BLAQ (one-step forward and backtrack) as an optax transform.

  One two-stage step (Ma et al. 2024, Eq. 4-10), for a quantized leaf, with
  ``ŵ_t = Q_{D_t}(w_t)`` the weights the caller's gradient ``g_t = ∇ℓ(ŵ_t)``
  was taken at.

  Stage 1, one step forward (nothing committed)::

      m1, v1 = b1 m + (1-b1) g_t,  b2 v + (1-b2) g_t²
      D1     = sqrt(v1 / (1 - b2^t)) + eps
      w*     = clip(w_t - lr · (m1 / (1 - b1^t)) / D1)                 (Eq. 6)
      ŵ*     = Q_{D1}(w*)                                             (Eq. 5)
      g*     = grad_fn(params with ŵ*)          (same batch; pmean-ed over
                                                 ``batch_axis_name`` if set)

  Stage 2, backtrack from ``w_t``::

      g_mix   = a g_t + (1-a) g*                                      (Eq. 9)
      v*      = b2 v + (1-b2) g*²;   D* = sqrt(v* / (1 - b2^t)) + eps
      D_mix   = a D1 + (1-a) D*                                       (Eq. 10)
      m       ← b1 m + (1-b1) g_mix        (computed as a m1 + (1-a) m*)
      v       ← a v1 + (1-a) v*
      w_{t+1} = clip(w_t - lr · (m / (1 - b1^t)) / D_mix)            (Eq. 8)
      ŵ_{t+1} = Q_{D_mix}(w_{t+1})                                     (Eq. 7)

  ``Q_D`` is the projection of :func:`blaq_jax.quantize` run to its fixed
  point, warm-started from the stored scale (``Q_{D1}(w*)`` and
  ``Q_{D_mix}(w_{t+1})`` both start from ``α_t``). The state keeps
  ``curvature = D_mix`` and the scale of ``ŵ_{t+1}``, so
  ``quantize_params(params, spec, state=state)`` is exactly Eq. 7.

  **The schedule.** The paper runs the two-stage step in one epoch out of
  every ``m`` (``m = 5`` on the small models, 10 on ImageNet) and plain LAQ
  otherwise. A step without the lookahead is ``update(grads, state, params,
  grad_fn=None)``: it is :func:`blaq_jax.laq`'s step, bit for bit, on the
  same :class:`BLAQState`. So the fast way is to decide on the host, where
  the training loop knows the step number, and to jit the step with the
  choice static: two compiled steps, and an off step costs a LAQ step plus
  the store of ``D`` in the state (1.03-1.06× LAQ on the MNIST MLP on CPU)::

    lookahead = bq.periodic_lookahead(m, steps_per_epoch)

    @functools.partial(jax.jit, static_argnames="active")
    def train_step(params, opt_state, batch, active):
      grads = jax.grad(loss)(bq.quantize_params(params, spec, state=opt_state), batch)
      grad_fn = (lambda p: jax.grad(loss)(p, batch)) if active else None
      updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
      return optax.apply_updates(params, updates), opt_state

    for step, batch in enumerate(batches):
      params, opt_state = train_step(params, opt_state, batch, lookahead(step))

  Alternatively ``lookahead_schedule=f`` decides inside the compiled step
  from ``state.count`` (a ``lax.cond`` whose off branch is LAQ's step and
  skips ``grad_fn``). That is one compiled step, but it costs more: the
  conditional copies its results, so an off step costs about two LAQ steps,
  and on XLA:CPU an on step's convolutions run several times slower inside
  the branch (benchmarks/README.md). A concrete bool (from
  ``inject_hyperparams`` or a schedule of a Python int) picks the branch
  at trace time, without the conditional. With ``grad_fn`` given and no
  schedule, every step is two-stage.

  Choices where the paper is silent: ``v*`` and ``D*`` are taken from the
  pre-step moment ``v`` (both stage-1 quantities are "one step from ``w_t``");
  the committed second moment mixes ``v1`` and ``v*`` with the same ``a`` as
  Eq. 10. Every mix is ``a x + (1-a) y`` of quantities LAQ computes the same
  way, so ``a = 1`` reproduces LAQ's trajectory bit for bit (``grad_fn`` is
  still called). A step whose ``g_t`` or ``g*`` is not finite is skipped
  (params, moments, curvature, scales and count stay; ``skipped`` grows by
  1); the skip is a select inside the fused update, not a branch, so
  ``grad_fn`` is still evaluated on such a step.

  Cost: on a two-stage step, two gradient evaluations (the caller's and
  ``grad_fn``'s) and two projections; a step with ``grad_fn=None`` costs
  about a LAQ step, so the paper's schedule costs about ``1 + 1/m`` gradient
  evaluations per step on average. ``v*`` is formed as ``v1 + (1-b2)(g*² -
  g_t²)`` (equal to ``b2 v + (1-b2) g*²`` up to rounding), so that the old
  ``v`` is not read after stage 1 and need not be copied.

  Deliberate differences from optax's conventions: BLAQ refuses to run under
  ``optax.masked`` / ``multi_transform`` (the lookahead needs the whole
  model; leaves with spec None already take the full-precision step). Under
  ``optax.MultiSteps`` the inner update, and so ``grad_fn``, runs once per
  ``k`` mini-steps, on whatever batch ``grad_fn`` closes over at that step
  (the last micro-batch): pass a ``grad_fn`` over the whole accumulated batch
  if that matters.

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count (its
      value at step 0 is checked; a traced value under
      ``optax.inject_hyperparams`` is not, see :mod:`blaq_jax._src.checks`).
    spec: the tree from :func:`blaq_jax.quant_spec`.
    a: weight of the current gradient in Eq. 9-10, in [0, 1]; ``a = 1`` is
      LAQ. The paper uses 0.6 on small data sets and 0.9 on ImageNet.
    lookahead_schedule: ``f(count) -> bool``, whether step ``count`` (the
      number of applied steps before it) runs the two-stage update, decided
      inside the compiled step (see above for its cost; the fast way leaves
      this None and passes ``grad_fn=None`` on the off steps); None: every
      step given a ``grad_fn`` is two-stage. A bool (or bool array) is taken
      as is: ``optax.inject_hyperparams`` evaluates a schedule per step and
      passes its value.
    b1, b2, eps: Adam's decay rates and epsilon.
    clip: latent weights of quantized leaves are clipped to ``[-clip, clip]``.
    batch_axis_name: under ``pmap``/``shard_map``, the axis over which the
      lookahead gradient is ``pmean``-ed (as ``optax.contrib.sam`` does). The
      caller averages ``g_t`` itself, as for any optax optimizer.
    skip_nonfinite: skip (and count) steps where ``g_t`` or ``g*`` is not
      finite; False drops the check (see :func:`blaq_jax.laq`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state,
    params, *, grad_fn=None)`` calls ``grad_fn`` once on two-stage steps;
    ``grad_fn=None`` is a step without the lookahead (LAQ's step).
    ``grad_fn(p)`` returns the gradient of the loss on the current batch at
    parameters ``p`` (a tree like ``params``), e.g. ``lambda p:
    jax.grad(loss)(p, batch)``. In ``optax.chain`` only the caller's gradient
    passes through the earlier transforms; ``g*`` comes straight from
    ``grad_fn``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import optax
    >>> import blaq_jax as bq
    >>> params = {"w": jnp.array([[0.3, -0.6], [0.9, -0.2]]), "b": jnp.zeros(2)}
    >>> spec = bq.quant_spec(params, bits=1)
    >>> tx = bq.blaq(learning_rate=0.1, spec=spec, a=0.6)
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum((p["w"] - 0.5) ** 2) + jnp.sum((p["b"] - 0.1) ** 2)
    >>> for _ in range(5):
    ...   grads = jax.grad(loss)(bq.quantize_params(params, spec, state=state))
    ...   updates, state = tx.update(grads, state, params, grad_fn=jax.grad(loss))
    ...   params = optax.apply_updates(params, updates)
    >>> print(np.asarray(bq.quantize_params(params, spec, state=state)["w"]).round(3))
    [[ 0.312 -0.312]
     [ 0.312  0.312]]

  References:
    Ma, Zhou, Ma, Yu & Li, `One-Step Forward and Backtrack: Overcoming Zig-Zagging
    in Loss-Aware Quantization Training
    <https://doi.org/10.1609/aaai.v38i13.29336>`_, AAAI 2024.
    Hou, Yao & Kwok, `Loss-aware Binarization of Deep Networks
    <https://arxiv.org/abs/1611.01600>`_, ICLR 2017.
  """
  checks.learning_rate("blaq", learning_rate)
  checks.number("blaq", "a", a, lo=0, hi=1)
  if not (lookahead_schedule is None or callable(lookahead_schedule)
          or isinstance(lookahead_schedule, (bool, np.bool_, jax.Array))):
    raise TypeError("blaq: lookahead_schedule must be None, a function of the step "
                    f"count returning a bool, or a bool, got {lookahead_schedule!r}")
  loss_aware.check_hyperparams("blaq", b1, b2, eps, clip)
  checks.boolean("blaq", "skip_nonfinite", skip_nonfinite)
  hyper = loss_aware.Hyper(b1, b2, eps, clip)

  def init_fn(params):
    return loss_aware.init_state(BLAQState, params, spec, "blaq.init")

  def update_fn(updates, state, params=None, *, grad_fn: GradFn | None = None,
                **extra_args):
    del extra_args
    checks.require_params("blaq.update", params)
    checks.grad_fn("blaq.update", grad_fn, required=False)
    loss_aware.check_not_masked(params, "blaq.update")
    tree_lib.check_like_params(updates, params, "updates", "blaq.update")
    lr = loss_aware.learning_rate_at(learning_rate, state.count)
    ok_t = step_ok(updates, lr, skip_nonfinite)

    def one_stage():
      return laq_step(spec, hyper, state, updates, params, lr, ok_t)

    if grad_fn is None:
      return one_stage()
    lookahead_grad: GradFn = grad_fn

    def two_stage():
      count = increment(state.count)
      stage1 = forward_step(spec, hyper, state, updates, params, lr, count)
      g_trial = tree_lib.check_grad_fn_result(lookahead_grad(stage1.trial), params,
                                              "blaq.update")
      if batch_axis_name is not None:
        g_trial = jax.lax.pmean(g_trial, axis_name=batch_axis_name)
      ok = None if ok_t is None else ok_t & all_finite(g_trial)
      return backtrack(spec, hyper, state, params, stage1, g_trial, a, lr, ok)

    if lookahead_schedule is None:
      return two_stage()
    active = (lookahead_schedule(state.count) if callable(lookahead_schedule)
              else lookahead_schedule)
    if isinstance(active, (bool, np.bool_)):
      return two_stage() if active else one_stage()
    return jax.lax.cond(jnp.asarray(active, bool), two_stage, one_stage)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ForwardStep(NamedTuple):
  """Stage 1 of BLAQ: moments with ``g_t`` and the trial weights ``ŵ*``.

  ``g`` and ``count`` are the gradient and step count stage 1 stepped
  with; ``nu`` is a buffer, from which stage 2 computes ``D1`` again.
  """
  mu: Any
  nu: Any
  den: Any
  trial: Any
  g: Any
  count: Any


def forward_step(spec, hyper: loss_aware.Hyper, state, g, params, lr, count) -> ForwardStep:
  """Eq. 5-6: one Adam/LAQ step from ``w_t``, quantized with ``D1`` (not committed)."""
  mu1 = loss_aware.moment(state.mu, g, hyper.b1)
  # nu1 as a buffer: stage 2 reads it rather than the old nu (which the new
  # nu then overwrites in place, with no copy kept), and D1 is computed from
  # it where it is read rather than kept as a second weight-sized buffer.
  nu1 = jax.lax.optimization_barrier(loss_aware.second_moment(state.nu, g, hyper.b2))

  def trial_step(mu1, nu1, params):
    den1 = loss_aware.denominator(nu1, count, hyper.b2, hyper.eps)
    return den1, loss_aware.step_latent(spec, params, mu1, den1, count, lr, hyper.b1, hyper.clip)

  den1, w_trial = trial_step(mu1, nu1, params)
  scale = spec_lib.map_with_spec(
      lambda s, w, d, a0: None if s is None else fit_scale(w, s, d, a0),
      spec, w_trial, den1, state.scale)
  # The codes take the trial weights again, from the step's inputs behind a
  # barrier with the scales: XLA then computes them inside the codes' loop
  # instead of keeping D1 and the step as temporaries the size of the
  # weights (on XLA:CPU those are page-faulted afresh on every call).
  inputs, scale = jax.lax.optimization_barrier(((state.mu, g, nu1, params), scale))
  mu0, g0, nu1_again, params0 = inputs
  w_again = trial_step(loss_aware.moment(mu0, g0, hyper.b1), nu1_again, params0)[1]
  trial = spec_lib.map_with_spec(
      lambda s, w, a: w if s is None else quantize_with_scale(w, s, a), spec, w_again, scale)
  return ForwardStep(mu1, nu1, den1, trial, g, count)


def backtrack(spec, hyper: loss_aware.Hyper, state, params, stage1: ForwardStep, g_trial, a, lr,
              ok=None):
  """Eq. 7-10: the step from ``w_t`` with the mixed gradient and curvature.

  Applied if ``ok`` (a scalar bool; None: always) and, with ``ok`` given, if
  the new latent weights are finite; a skipped step selects the old values
  leafwise. Returns ``(updates, new_state)``; ``new_state`` keeps
  ``state``'s type and replaces ``count, mu, nu, curvature, scale, skipped``.
  """
  b1, b2 = hyper.b1, hyper.b2
  count, skipped = counted(ok, state.count, state.skipped)
  # b1 m + (1-b1) g_mix is linear in g_mix, so it equals a m1 + (1-a) m*;
  # mixing the moments (not the gradients) keeps a = 1 bit-exact with LAQ.
  mu = select(ok, loss_aware.mix(a, stage1.mu, loss_aware.moment(state.mu, g_trial, b1)), state.mu)
  # From nu1, so that the old nu is not read again after stage 1.
  nu_trial = loss_aware.second_moment_instead(stage1.nu, stage1.g, g_trial, b2)
  nu = select(ok, loss_aware.mix(a, stage1.nu, nu_trial), state.nu)
  den_trial = loss_aware.denominator(nu_trial, count, b2, hyper.eps)
  # D1 from the buffer nu1 under a second name, computed where it is read.
  den1 = loss_aware.denominator(jax.lax.optimization_barrier(stage1.nu), stage1.count, b2,
                                hyper.eps)
  den_mix = loss_aware.mix(a, den1, den_trial)
  curv = select(ok, loss_aware.quantized_curvature(spec, den_mix), state.curvature)
  # The step reads D_mix from the buffer it is stored in (where the step is
  # not applied, neither is its result), not from a second temporary.
  step_den = spec_lib.map_with_spec(lambda s, d, c: d if s is None else c, spec, den_mix, curv)
  new_params = select(
      ok, loss_aware.step_latent(spec, params, mu, step_den, count, lr, b1, hyper.clip), params)
  applied = loss_aware.as_applied(new_params, params)
  scale = select(ok, next_scales(spec, applied, curv, state.scale), state.scale)
  new_state = state._replace(count=count, mu=mu, nu=nu, curvature=curv, scale=scale,
                             skipped=skipped)
  new_params, new_state = skip_if_nonfinite(ok, new_params, params, new_state, state, spec,
                                            latent_check_needed(hyper.eps))
  return loss_aware.updates_from(new_params, params), new_state
