"""The training methods of the examples and benchmarks, in one registry.

Each :class:`Method` says how to build its optimizer, which weights ``ŵ`` the
forward pass uses (and packs and exports), and how many gradient evaluations
its steps spend; every example (``classification``, ``imagenet_resnet18``,
``lm``, ``demo``, ``toy_2d``) and the benchmarks take their methods, by these
names, from :data:`METHODS`, and :func:`Method.step` is the one training step
they all run. Adding a method is one entry in :data:`METHODS`. Only the public
API (``blaq_jax``, ``blaq_jax.contrib``) is used.

Forward maps (``Method.forward``):

* ``"identity"``: ``ŵ = w`` (full precision);
* ``"plain"``: ``ŵ = Q(w)``, the plain (``D = 1``) projection of the STE family,
  ``bq.quantize_params(params, spec)``; the gradient is taken at ``ŵ`` and
  applied to ``w`` (the straight-through / coarse gradient);
* ``"loss_aware"``: ``ŵ = Q_D(w)`` with the curvature and scales of the
  LAQ/BLAQ state, ``bq.quantize_params(params, spec, state=opt_state)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

import blaq_jax as bq
import blaq_jax.contrib as bq_contrib

FORWARDS = ("identity", "plain", "loss_aware")


@dataclasses.dataclass(frozen=True)
class Options:
  """The hyper-parameters a method may read (each method ignores the others)."""

  a: float = 0.6                   # BLAQ's mixing weight (Eq. 9-10)
  m: int = 5                       # blaq-m: the two-stage update in one epoch of every m
  lookahead_phase: int | None = None   # blaq-m: which epoch of the period (None: m - 1)
  steps_per_epoch: int = 1
  batch_axis_name: str | None = None   # BLAQ under pmap: pmean the lookahead gradient
  dampen_weight: float = 1e-2      # ste-dampen: lambda of Nagel et al.'s regulariser
  freeze_threshold: float = 0.02   # ste-freeze: EMA oscillation frequency that freezes
  blend_steps: int = 1             # ste-alpha-blend: steps until alpha reaches 1


def _one(o: Options, steps: int) -> int:
  return steps


def _two(o: Options, steps: int) -> int:
  return 2 * steps


def lookahead_steps(o: Options, steps: int) -> int:
  """Steps among the first ``steps`` on which ``bq.periodic_lookahead(o.m,
  o.steps_per_epoch, phase=o.lookahead_phase)`` is on (epoch ``e``, counted
  from 0, is active when ``e % m == phase``)."""
  m, spe = o.m, o.steps_per_epoch
  phase = m - 1 if o.lookahead_phase is None else o.lookahead_phase
  full, rest = divmod(steps, spe)
  active = sum(1 for e in range(full) if e % m == phase) * spe
  return active + (rest if full % m == phase else 0)


def _periodic(o: Options, steps: int) -> int:
  return steps + lookahead_steps(o, steps)


def _periodic_lookahead(o: Options):
  return bq.periodic_lookahead(o.m, o.steps_per_epoch, phase=o.lookahead_phase)


def _every_step(o: Options):
  return lambda step: True


@dataclasses.dataclass(frozen=True)
class Method:
  """One training method.

  Attributes:
    name: the registry key.
    label: the name in tables and plots.
    optimizer: ``(learning_rate, spec, options) -> optax transform``.
    forward: how ``ŵ`` is computed (one of :data:`FORWARDS`).
    grad_evals: ``(options, steps) -> gradient evaluations`` of the first
      ``steps`` steps.
    run_scale: ``options -> factor`` on the run's length (LAQ given BLAQ's
      gradient budget); 1 for most.
    reuse_trial_gradient: the step evaluates its one gradient at BLAQ's trial
      point (``blaq_contrib.blaq_reuse``) instead of at ``ŵ``.
    blend: the forward pass uses ``(1-α) w + α sg(Q(w))`` (alpha-blending).
    lookahead: ``options -> (step -> bool)``, on which steps BLAQ's two-stage
      update runs, decided on the host (the training loops compile a step for
      each answer and pass it as :meth:`step`'s ``lookahead``); None for
      methods without a lookahead gradient.
  """

  name: str
  label: str
  optimizer: Callable[[Any, Any, Options], optax.GradientTransformation]
  forward: str
  grad_evals: Callable[[Options, int], int] = _one
  run_scale: Callable[[Options], float] = lambda o: 1.0
  reuse_trial_gradient: bool = False
  blend: bool = False
  lookahead: Callable[[Options], Callable[[int], bool]] | None = None

  def __post_init__(self):
    if self.forward not in FORWARDS:
      raise ValueError(f"Method {self.name}: forward must be one of {FORWARDS}")

  @property
  def quantized(self) -> bool:
    """Whether the model runs with quantized weights."""
    return self.forward != "identity"

  def grad_evals_per_step(self, o: Options) -> float:
    """The mean over a whole lookahead period (e.g. ``1 + 1/m`` for blaq-m)."""
    period = o.m * o.steps_per_epoch
    return self.grad_evals(o, period) / period

  def lookahead_at(self, o: Options, step: int) -> bool:
    """Whether step ``step`` (0-based, counted by the training loop) runs the
    two-stage update; False for methods without a lookahead."""
    return bool(self.lookahead(o)(step)) if self.lookahead else False

  def _projection(self, params, spec, opt_state) -> tuple[Any, Any]:
    """``(spec, state)`` of the projection that gives ``ŵ``: no leaf quantized
    for ``"identity"``, the plain projection for ``"plain"`` and the stored
    scales of the LAQ/BLAQ state for ``"loss_aware"``."""
    if self.forward == "identity":
      return jax.tree.map(lambda _: None, params), None
    return spec, (opt_state if self.forward == "loss_aware" else None)

  def weights(self, params, spec, opt_state):
    """``ŵ``: the weights the forward pass and the evaluation use."""
    if self.forward == "identity":
      return params
    spec, state = self._projection(params, spec, opt_state)
    return bq.quantize_params(params, spec, state=state)

  def pack(self, params, spec, opt_state):
    """The packed model of :meth:`weights` (``bq.pack_params``): its
    ``bq.dequantize_tree`` is ``weights(params, spec, opt_state)`` as computed
    outside ``jit``, bit for bit, and is the same inside ``jit`` (where XLA
    may round ``quantize_params``'s product differently by one ulp)."""
    spec, state = self._projection(params, spec, opt_state)
    return bq.pack_params(params, spec, state=state)

  def export(self, params, spec, opt_state) -> dict:
    """:meth:`pack` as the ``.npz`` dict of ``bq.pack``, ready for
    ``bq.save_packed`` (a caller may add arrays of its own, e.g. a tag)."""
    spec, state = self._projection(params, spec, opt_state)
    return bq.pack(params, spec, state=state)

  def step(self, tx, spec, params, opt_state, loss_fn, *, count=0, options=Options(),
           reduce=lambda g: g, lookahead: bool = True):
    """One step of the method: ``(updates, opt_state, loss, aux)``.

    ``loss_fn(params) -> (loss, aux)`` is evaluated at ``ŵ`` (at the trial point
    for ``reuse_trial_gradient``, at the blended weights for ``blend``);
    ``count`` is the step number (alpha-blending's schedule); ``reduce`` is
    applied to the caller's gradient (``dp.pmean`` under pmap). ``lookahead``
    (a Python bool, static under ``jit``) False passes ``grad_fn=None``: BLAQ
    then takes LAQ's step, at LAQ's cost (:meth:`lookahead_at` says which).
    """
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    if self.reuse_trial_gradient:
      # One gradient, at the trial weights; its loss and aux are returned.
      trial = []

      def grad_fn(p):
        (loss, aux), g = value_and_grad(p)
        trial.append((loss, aux))
        return g

      updates, opt_state = tx.update(optax.tree.zeros_like(params), opt_state, params,
                                     grad_fn=grad_fn)
      loss, aux = trial[0]
      return updates, opt_state, loss, aux
    if self.blend:
      # Forward (1-α) w + α sg(Q(w)); the gradient flows to w through (1-α) w.
      alpha = bq.alpha_blending_schedule(0, options.blend_steps)(count)
      blended = lambda p: loss_fn(bq.alpha_blend_params(p, spec, alpha))
      (loss, aux), grads = jax.value_and_grad(blended, has_aux=True)(params)
      updates, opt_state = tx.update(reduce(grads), opt_state, params)
      return updates, opt_state, loss, aux
    (loss, aux), grads = value_and_grad(self.weights(params, spec, opt_state))
    grad_fn = (lambda p: jax.grad(loss_fn, has_aux=True)(p)[0]) if lookahead else None
    updates, opt_state = tx.update(reduce(grads), opt_state, params, grad_fn=grad_fn)
    return updates, opt_state, loss, aux


def _ste(lr, spec, o):
  return bq.ste(optax.adam(lr), spec)


_ENTRIES = (
    Method("fp", "FP", lambda lr, spec, o: optax.adam(lr), "identity"),
    Method("bwn-ste", "BWN-STE", _ste, "plain"),
    Method("ste-dampen", "STE+dampen",
           lambda lr, spec, o: optax.chain(bq.add_oscillation_dampening(o.dampen_weight, spec),
                                           _ste(lr, spec, o)), "plain"),
    Method("ste-freeze", "STE+freeze",
           lambda lr, spec, o: optax.chain(_ste(lr, spec, o),
                                           bq.freeze_oscillations(o.freeze_threshold, spec)),
           "plain"),
    Method("ste-alpha-blend", "STE+alpha-blend", _ste, "plain", blend=True),
    Method("laq", "LAQ", lambda lr, spec, o: bq.laq(lr, spec), "loss_aware"),
    Method("laq-noskip", "LAQ (no skip)",
           lambda lr, spec, o: bq.laq(lr, spec, skip_nonfinite=False), "loss_aware"),
    Method("laq-as-blaq", "LAQ at BLAQ's budget", lambda lr, spec, o: bq.laq(lr, spec),
           "loss_aware", run_scale=lambda o: 2.0),
    Method("laq-as-blaq-m", "LAQ at BLAQ-m's budget", lambda lr, spec, o: bq.laq(lr, spec),
           "loss_aware", run_scale=lambda o: 1.0 + 1.0 / o.m),
    Method("blaq", "BLAQ",
           lambda lr, spec, o: bq.blaq(lr, spec, a=o.a, batch_axis_name=o.batch_axis_name),
           "loss_aware", grad_evals=_two, lookahead=_every_step),
    Method("blaq-noskip", "BLAQ (no skip)",
           lambda lr, spec, o: bq.blaq(lr, spec, a=o.a, batch_axis_name=o.batch_axis_name,
                                       skip_nonfinite=False), "loss_aware", grad_evals=_two,
           lookahead=_every_step),
    # The period is decided on the host: an off step is a LAQ step, compiled apart.
    Method("blaq-m", "BLAQ-m",
           lambda lr, spec, o: bq.blaq(lr, spec, a=o.a, batch_axis_name=o.batch_axis_name),
           "loss_aware", grad_evals=_periodic, lookahead=_periodic_lookahead),
    Method("blaq-reuse", "BLAQ-reuse",
           lambda lr, spec, o: bq_contrib.blaq_reuse(lr, spec, a=o.a), "loss_aware",
           reuse_trial_gradient=True),
    Method("blaq-model", "BLAQ-model",
           lambda lr, spec, o: bq_contrib.blaq_model(lr, spec, a=o.a), "loss_aware"),
)

METHODS: dict[str, Method] = {m.name: m for m in _ENTRIES}


def get(name: str) -> Method:
  """The method called ``name``; a one-line error otherwise."""
  method = METHODS.get(name)
  if method is None:
    raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
  return method


def skip_count(opt_state):
  """Steps the LAQ/BLAQ states in ``opt_state`` skipped so far (non-finite
  gradients or weights); 0 for the methods without such a state."""
  is_quant = lambda x: isinstance(x, (bq.LAQState, bq.BLAQState))
  found = [x.skipped for x in jax.tree.leaves(opt_state, is_leaf=is_quant) if is_quant(x)]
  return sum(found) if found else jax.numpy.zeros([], jax.numpy.int32)


def skip_runs(flags, carried: int) -> tuple[int, int, int]:
  """``(skipped steps, longest run of consecutive skips, run at the end)`` of
  per-step ``flags``; the run continues the ``carried`` one before them."""
  run = longest = carried
  for f in flags:
    run = run + 1 if f else 0
    longest = max(longest, run)
  return int(sum(bool(f) for f in flags)), longest, run
