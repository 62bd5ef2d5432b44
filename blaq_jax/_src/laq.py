"""LAQ: loss-aware weight quantization trained with Adam.

One step, for a quantized leaf (``ŵ_t = Q_{D_t}(w_t)`` is what the caller's
forward/backward pass used, with ``D_t = curvature(state)``):

    g_t     = ∇ℓ(ŵ_t)                                  (given as ``updates``)
    m, v    ← b1 m + (1-b1) g_t,  b2 v + (1-b2) g_t²
    D_{t+1} = sqrt(v / (1 - b2^t)) + eps
    w_{t+1} = clip(w_t - lr · (m / (1 - b1^t)) / D_{t+1}, -c, c)

and the next forward pass uses ``ŵ_{t+1} = Q_{D_{t+1}}(w_{t+1})`` (see
:func:`blaq_jax.quantize_params`). ``D`` is Adam's denominator, the diagonal
curvature estimate of the proximal Newton derivation. Leaves whose spec is None
take the same Adam step without clipping. Steps whose gradient is not finite
are skipped: params, moments and the step count stay, ``skipped`` grows by 1.

References:
  Hou, Yao & Kwok, "Loss-aware Binarization of Deep Networks", ICLR 2017.
  Hou & Kwok, "Loss-aware Weight Quantization of Deep Networks", ICLR 2018.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import optax

from blaq_jax._src import adam_core as core


class LAQState(NamedTuple):
  """State of :func:`laq`.

  Attributes:
    count: number of applied (finite) steps.
    mu: Adam first moment.
    nu: Adam second moment.
    curvature: ``D`` for quantized leaves (None elsewhere); ones at init.
    skipped: number of steps skipped for non-finite gradients.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  curvature: Any
  skipped: jax.Array


def laq(
    learning_rate: optax.ScalarOrSchedule,
    spec,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip: Optional[float] = 1.0,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Loss-aware quantization (LAQ) as an optax transform.

  Args:
    learning_rate: a float or an optax schedule of the step count.
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
    be taken at ``quantize_params(params, spec, curvature(state))``.
  """
  core.check_hyperparams("laq", b1, b2, eps, clip)

  def init_fn(params):
    return core.init_state(LAQState, params, spec, "laq.init")

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("laq.update: params are required (pass params=...)")

    def compute():
      count = optax.safe_increment(state.count)
      lr = core.learning_rate_at(learning_rate, state.count)
      mu = core.moment(state.mu, updates, b1)
      nu = core.second_moment(state.nu, updates, b2)
      den = core.denominator(nu, count, b2, eps)
      new_params = core.step_latent(spec, params, mu, den, count, lr, b1, clip)
      curv = core.quantized_curvature(spec, den)
      return new_params, LAQState(count, mu, nu, curv, state.skipped)

    ok = core.all_finite(updates) if skip_nonfinite else None
    return core.step_or_skip(ok, compute, state, params, updates)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
