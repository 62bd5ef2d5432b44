"""BLAQ's forward-and-backtrack at (about) the cost of one gradient per step.

BLAQ (``blaq_jax.blaq``) evaluates two gradients per step: ``g_t`` at the
current quantized weights ``ŵ_t`` and ``g*`` at the trial weights ``ŵ*``
(Eq. 4-10 of Ma et al. 2024). The variants here keep its stage 1 / stage 2
structure (``blaq.forward_step`` and ``blaq.backtrack``) and change only where
``g_t`` and ``g*`` come from:

* :func:`blaq_reuse` -- one gradient per step, at the trial point. The trial
  gradient of step ``t`` stands in for the current-point gradient of step
  ``t+1`` (``g_{t+1} := g*_t``), in the spirit of Popov's past-extragradient /
  optimistic methods: ``ŵ*_t`` and ``ŵ_{t+1}`` are two projections of nearly
  the same latent weights and mostly share their codes. The caller's
  ``updates`` are ignored; on the first step ``a`` is taken as 0 (there is no
  earlier trial gradient, and the trial point then equals ``ŵ_0``).
* :func:`blaq_model` -- no second gradient: ``g*`` is predicted by the local
  quadratic model that LAQ itself assumes (Eq. 1-4), with the curvature that
  the Adam step implies, ``H = D1 / lr``:
  ``g* ≈ g_t + (D1 / lr) ⊙ (ŵ* - ŵ_t)``. Where no code changes the
  correction is small; where the trial step flips a code it adds a restoring
  gradient of the size of the flip. Leaves that are not quantized take
  ``g* = g_t``.

Experimental: measured in benchmarks/README.md, neither beats LAQ at equal
compute. ``blaq_model`` can also stall: its restoring term
``(1-a) (D1 / lr) (ŵ* - ŵ_t)`` outweighs ``a g_t`` wherever a flip's size
``2 alpha`` exceeds about ``lr`` (``D1`` is about ``|g|`` under Adam), so the
codes that the trial step would flip never flip. On the 2x3 problem of the
conformance tests it stays at loss 0.89 (from 1.67) after 600 steps, where
LAQ, BLAQ and ``blaq_reuse`` reach 0.

(The lookahead on a schedule, e.g. every ``m``-th epoch as the paper runs
it, is ``blaq_jax.blaq`` with ``grad_fn=None`` on the off steps.)

Departures from Eq. 4-10: ``blaq_reuse`` replaces ``ĝ^t`` in Eq. 6 and 9 by the
previous step's ``ĝ^{*(t)}``; ``blaq_model`` replaces ``ĝ^{*(t+1)}`` in Eq. 9
by a first-order Taylor estimate (and ``D*`` in Eq. 10 by its moment).

References:
  Ma et al., `One-Step Forward and Backtrack: Overcoming Zig-Zagging in Loss-Aware
  Quantization Training <https://doi.org/10.1609/aaai.v38i13.29336>`_, AAAI 2024.
  Popov, "A modification of the Arrow-Hurwicz method for search of saddle
  points", Mathematical Notes 1980 (past extragradient).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from blaq_jax._src import checks
from blaq_jax._src import loss_aware
from blaq_jax._src import spec as spec_lib
from blaq_jax._src import tree as tree_lib
from blaq_jax._src.blaq import BLAQState, GradFn, backtrack, forward_step
from blaq_jax._src.quantizers import quantize_with_scale
from blaq_jax._src.skipping import increment, select, step_ok
from blaq_jax._src.spec import QuantSpecTree


def _check(where, learning_rate, a):
  checks.learning_rate(where, learning_rate)
  checks.number(where, "a", a, lo=0, hi=1)


def _blaq_init(spec, where):
  return lambda params: loss_aware.init_state(BLAQState, params, spec, where)


def _check_update(where, updates, params, grad_fn=None, *, lookahead: bool):
  """The checks :func:`blaq_jax.blaq` makes on ``update``'s arguments; with
  ``lookahead`` (a ``grad_fn`` is called, on the whole model) ``grad_fn`` is
  required and ``optax.masked`` refused."""
  checks.require_params(where, params)
  if lookahead:
    checks.grad_fn(where, grad_fn, required=True)
    loss_aware.check_not_masked(params, where)
  tree_lib.check_like_params(updates, params, "updates", where)


class BLAQReuseState(NamedTuple):
  """State of :func:`blaq_reuse`: BLAQ's fields plus the last trial gradient."""

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  curvature: Any
  scale: Any
  skipped: jax.Array
  trial_grad: optax.Updates


def blaq_reuse(
    learning_rate: optax.ScalarOrSchedule,
    spec: QuantSpecTree,
    *,
    a: float = 0.6,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip: float | None = 1.0,
    batch_axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """One gradient per step: the trial gradient is reused as the next ``g_t``.

  ``update(updates, state, params, *, grad_fn)`` ignores ``updates`` (pass
  e.g. ``optax.tree.zeros_like(params)``; do not spend a gradient on it) and
  calls ``grad_fn`` once, at the trial weights. One step (BLAQ's Eq. 4-10 with
  ``g_t`` replaced by the previous trial gradient; ``a = 0`` at the first step)::

      g_t  := g*_{t-1}                                  (0 at t = 0)
      stage 1:  m1, v1 ← Adam moments of g_t;  w* = clip(w_t - lr m̂1 / D1);  ŵ* = Q_{D1}(w*)
      g*_t = grad_fn(ŵ*)                                (the one gradient)
      stage 2:  w_{t+1} = clip(w_t - lr m̂(a g_t + (1-a) g*_t) / (a D1 + (1-a) D*))

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count, as
      for :func:`blaq_jax.blaq`.
    spec: the tree from :func:`blaq_jax.quant_spec` (QuantSpec or None per leaf).
    a: weight of ``g_t`` in the mixed gradient and curvature, in [0, 1].
    b1, b2, eps: Adam's decay rates and epsilon.
    clip: latent weights of quantized leaves are clipped to ``[-clip, clip]``.
    batch_axis_name: under ``pmap``/``shard_map``, the axis over which the
      trial gradient is ``pmean``-ed.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(updates,
    state, params, *, grad_fn)`` requires ``params`` and ``grad_fn`` and
    makes :func:`blaq_jax.blaq`'s checks on them. A step whose trial gradient
    or learning rate is not finite is skipped and counted in ``skipped``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import optax
    >>> import blaq_jax as bq
    >>> from blaq_jax import contrib
    >>> params = {"w": jnp.array([[0.3, -0.6], [0.9, -0.2]]), "b": jnp.zeros(2)}
    >>> spec = bq.quant_spec(params, bits=1)
    >>> tx = contrib.blaq_reuse(0.1, spec)
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum((p["w"] - 0.5) ** 2) + jnp.sum((p["b"] - 0.1) ** 2)
    >>> for _ in range(5):
    ...   unused = optax.tree.zeros_like(params)  # the one gradient comes from grad_fn
    ...   updates, state = tx.update(unused, state, params, grad_fn=jax.grad(loss))
    ...   params = optax.apply_updates(params, updates)
    >>> print(np.asarray(bq.quantize_params(params, spec, state=state)["w"]).round(3))
    [[ 0.3 -0.3]
     [ 0.3  0.3]]

  References:
    Ma et al., `One-Step Forward and Backtrack: Overcoming Zig-Zagging in Loss-Aware
    Quantization Training <https://doi.org/10.1609/aaai.v38i13.29336>`_, AAAI 2024.
    Popov, "A modification of the Arrow-Hurwicz method for search of saddle
    points", Mathematical Notes 1980 (past extragradient).
  """
  _check("blaq_reuse", learning_rate, a)
  loss_aware.check_hyperparams("blaq_reuse", b1, b2, eps, clip)
  hyper = loss_aware.Hyper(b1, b2, eps, clip)

  def init_fn(params):
    state = _blaq_init(spec, "blaq_reuse.init")(params)
    return BLAQReuseState(**state._asdict(), trial_grad=optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None, *, grad_fn: GradFn | None = None, **extra):
    del extra
    _check_update("blaq_reuse.update", updates, params, grad_fn, lookahead=True)
    assert grad_fn is not None  # refused above; this tells the type checker
    count = increment(state.count)
    lr = loss_aware.learning_rate_at(learning_rate, state.count)
    g_prev = state.trial_grad
    stage1 = forward_step(spec, hyper, state, g_prev, params, lr, count)
    g_trial = tree_lib.check_grad_fn_result(grad_fn(stage1.trial), params, "blaq_reuse.update")
    if batch_axis_name is not None:
      g_trial = jax.lax.pmean(g_trial, axis_name=batch_axis_name)
    a_t = jnp.where(state.count == 0, 0.0, a)
    ok = step_ok(g_trial, lr, True)
    updates, new_state = backtrack(spec, hyper, state, params, stage1, g_trial, a_t, lr, ok)
    return updates, new_state._replace(trial_grad=select(ok, g_trial, state.trial_grad))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def blaq_model(
    learning_rate: optax.ScalarOrSchedule,
    spec: QuantSpecTree,
    *,
    a: float = 0.6,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip: float | None = 1.0,
) -> optax.GradientTransformationExtraArgs:
  """BLAQ with ``g*`` predicted by the quadratic model: no second gradient.

  ``update(grads, state, params)``; ``grads`` taken at
  ``quantize_params(params, spec, state=state)`` as for LAQ. One step (BLAQ's
  Eq. 4-10 with ``g*`` from LAQ's local quadratic model, ``H = D1 / lr``)::

      stage 1:  m1, v1 ← Adam moments of g_t;  w* = clip(w_t - lr m̂1 / D1);  ŵ* = Q_{D1}(w*)
      g*  ≈ g_t + (D1 / lr) ⊙ (ŵ* - ŵ_t)                (no gradient evaluation)
      stage 2:  w_{t+1} = clip(w_t - lr m̂(a g_t + (1-a) g*) / (a D1 + (1-a) D*))

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count, as
      for :func:`blaq_jax.laq`.
    spec: the tree from :func:`blaq_jax.quant_spec` (QuantSpec or None per leaf).
    a: weight of ``g_t`` in the mixed gradient and curvature, in [0, 1];
      ``a = 1`` is LAQ.
    b1, b2, eps: Adam's decay rates and epsilon.
    clip: latent weights of quantized leaves are clipped to ``[-clip, clip]``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
    and makes :func:`blaq_jax.laq`'s checks on its arguments. It calls no
    ``grad_fn``, so, unlike :func:`blaq_jax.blaq`, it runs under
    ``optax.masked`` and ``multi_transform``. A step whose gradient or
    learning rate is not finite is skipped and counted in ``skipped``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import blaq_jax as bq
    >>> from blaq_jax import contrib
    >>> params = {"w": jnp.array([[0.3, -0.6], [0.9, -0.2]]), "b": jnp.zeros(2)}
    >>> spec = bq.quant_spec(params, bits=1)
    >>> tx = contrib.blaq_model(0.1, spec)
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum((p["w"] - 0.5) ** 2) + jnp.sum((p["b"] - 0.1) ** 2)
    >>> grads = jax.grad(loss)(bq.quantize_params(params, spec, state=state))
    >>> updates, state = tx.update(grads, state, params)
    >>> print(int(state.count), int(state.skipped))
    1 0

  References:
    Ma et al., `One-Step Forward and Backtrack: Overcoming Zig-Zagging in Loss-Aware
    Quantization Training <https://doi.org/10.1609/aaai.v38i13.29336>`_, AAAI 2024.
    Hou & Kwok, `Loss-aware Weight Quantization of Deep Networks
    <https://arxiv.org/abs/1802.08635>`_, ICLR 2018 (the quadratic model).
  """
  _check("blaq_model", learning_rate, a)
  loss_aware.check_hyperparams("blaq_model", b1, b2, eps, clip)
  hyper = loss_aware.Hyper(b1, b2, eps, clip)

  def update_fn(updates, state, params=None, **extra):
    del extra
    _check_update("blaq_model.update", updates, params, lookahead=False)
    count = increment(state.count)
    lr = loss_aware.learning_rate_at(learning_rate, state.count)
    stage1 = forward_step(spec, hyper, state, updates, params, lr, count)
    inv_lr = jnp.where(lr > 0, 1.0 / jnp.where(lr > 0, lr, 1.0), 0.0)

    def predict(s, g, w, alpha, d1, trial):
      if s is None:
        return g
      current = quantize_with_scale(w, s, alpha)
      return g + (d1 * inv_lr).astype(g.dtype) * (trial - current)

    g_trial = spec_lib.map_with_spec(predict, spec, updates, params, state.scale,
                                     stage1.den, stage1.trial)
    return backtrack(spec, hyper, state, params, stage1, g_trial, a, lr,
                     step_ok(updates, lr, True))

  return optax.GradientTransformationExtraArgs(_blaq_init(spec, "blaq_model.init"),
                                               update_fn)
