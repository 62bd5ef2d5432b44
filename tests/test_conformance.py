"""Conformance: blaq_jax's transforms behave like optax's own under its wrappers.

Modelled on optax's shared optimizer tests (``alias_test.py``,
``contrib/_common_test.py``, the wrapper, combine, state-utils and sharding
tests), adapted to quantized training: the gradient is taken at the
quantized weights ``ŵ``, and "converges" means the loss at ``ŵ`` reaches the
best value the code set can reach while full-precision leaves converge.

Parameterised over every public transform and a few chains. Each case's
jitted step is compiled once per (case, params kind, dtype) and shared by
the tests (``_step``), and every step donates params and state, so the whole
file also checks donation.

Deliberate differences from optax (tested here, documented in the README):
LAQ/BLAQ skip non-finite steps themselves (``optax.apply_if_finite`` still
works around them); BLAQ refuses ``optax.masked`` / ``partition`` (its
lookahead needs the whole model); under ``optax.MultiSteps`` BLAQ calls
``grad_fn`` at every mini-step, on that mini-step's batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blaq_jax as bq
from blaq_jax import contrib

LR = 0.05
# The kernel target is representable at 1 and 2 bits (per tensor and per
# channel): alpha * {-1, +1}. The bias is not quantized.
W_TARGET = 0.5 * np.array([[1., -1., 1.], [-1., 1., 1.]], np.float32)
B_TARGET = np.array([0.3, -0.2, 0.1], np.float32)


class Case(NamedTuple):
  name: str
  make: Callable[[Any], optax.GradientTransformation]  # spec -> tx
  bits: int = 1
  per_channel: bool = False
  laq_like: bool = True  # forward with quantize_params(.., curvature(state)), else STE
  grad_fn: bool = False  # update needs grad_fn (BLAQ)


CASES = [
    Case("laq1", lambda s: bq.laq(LR, s)),
    Case("laq2", lambda s: bq.laq(LR, s), bits=2),
    Case("laq1_channel", lambda s: bq.laq(LR, s), per_channel=True),
    Case("laq2_channel", lambda s: bq.laq(LR, s), bits=2, per_channel=True),
    Case("blaq", lambda s: bq.blaq(LR, s, a=0.6), grad_fn=True),
    Case("ste_adam", lambda s: bq.ste(optax.adam(LR), s), laq_like=False),
    Case("dampening_ste", lambda s: bq.ste(optax.chain(
        bq.add_oscillation_dampening(1e-3, s), optax.adam(LR)), s), laq_like=False),
    Case("ste_freezing", lambda s: optax.chain(
        bq.ste(optax.adam(LR), s), bq.freeze_oscillations(0.5, s)), laq_like=False),
    Case("laq_tracking", lambda s: optax.chain(
        bq.laq(LR, s), bq.track_oscillations(s, window=3))),
    # blaq_jax.contrib, held to the same table.
    Case("contrib_blaq_model", lambda s: contrib.blaq_model(LR, s, a=0.6)),
    Case("contrib_blaq_reuse", lambda s: contrib.blaq_reuse(LR, s, a=0.6), grad_fn=True),
]
BY_NAME = {c.name: c for c in CASES}
IDS = [c.name for c in CASES]
# One representative per code path (LAQ, BLAQ, STE, dampening, freezing,
# tracking), for the grids that would otherwise compile too many programs.
CORE = ["laq1", "blaq", "ste_adam", "dampening_ste", "ste_freezing", "laq_tracking"]
# blaq_jax.contrib's transforms, which join CORE in those grids (as optax's
# contrib/_common_test.py runs every contrib optimizer through the same tests).
CONTRIB = ["contrib_blaq_model", "contrib_blaq_reuse"]
LAQ_BLAQ = {"laq1", "laq2", "laq1_channel", "laq2_channel", "blaq", "laq_tracking", *CONTRIB}


class NT(NamedTuple):
  kernel: Any
  bias: Any


def make_params(kind="dict", dtype=jnp.float32):
  k1, k2 = jax.random.split(jax.random.key(0))
  w = (0.1 * jax.random.normal(k1, (2, 3))).astype(dtype)
  b = (0.1 * jax.random.normal(k2, (3,))).astype(dtype)
  if kind == "dict":
    return {"w": w, "b": b}
  if kind == "mixed_containers":  # None, empty containers, tuple, namedtuple
    return {"none": None, "empty": {}, "nested": ({}, []),
            "tuple": (w, b), "nt": NT(w + 0.01, b - 0.01)}
  raise ValueError(kind)


def target_like(params):
  """The loss's minimiser, leafwise: kernels W_TARGET, biases B_TARGET."""
  return jax.tree.map(
      lambda p: jnp.asarray(W_TARGET if p.ndim == 2 else B_TARGET, p.dtype), params)


def loss_fn(target, q):
  diffs = [jnp.sum((a.astype(jnp.float32) - t.astype(jnp.float32)) ** 2)
           for a, t in zip(jax.tree.leaves(q), jax.tree.leaves(target))]
  return sum(diffs, jnp.zeros([], jnp.float32))


def spec_for(case, params):
  return bq.quant_spec(params, bits=case.bits, per_channel=case.per_channel)


def forward(case, spec, tx_state_of, params, state):
  """The weights the forward pass uses (ŵ)."""
  if case.laq_like:
    return bq.quantize_params(params, spec, bq.curvature(tx_state_of(state)))
  return bq.ste_quantize_params(params, spec)


def make_step(case, spec, tx, target, *, grad_dtype=None, wrap=lambda s: s):
  """``step(params, state) -> (params, state, updates, loss at ŵ)``.

  ``wrap`` maps the optimizer state to the part that holds the LAQ/BLAQ
  state (identity; curvature finds it anywhere anyway).
  """
  loss = functools.partial(loss_fn, target)

  def grads_at(p):
    g = jax.grad(loss)(p)
    return g if grad_dtype is None else jax.tree.map(lambda x: x.astype(grad_dtype), g)

  def step(params, state):
    q = forward(case, spec, wrap, params, state)
    kw = {"grad_fn": grads_at} if case.grad_fn else {}
    updates, state = tx.update(grads_at(q), state, params, **kw)
    return optax.apply_updates(params, updates), state, updates, loss(q)

  return step


TRACES = {}


@functools.cache
def _step(name, kind="dict", dtype="float32", grad_dtype=None):
  """The jitted, donating step of one case, compiled once and shared."""
  case = BY_NAME[name]
  params = make_params(kind, jnp.dtype(dtype))
  spec = spec_for(case, params)
  tx = case.make(spec)
  key = (name, kind, dtype, grad_dtype)
  inner = make_step(case, spec, tx, target_like(params),
                    grad_dtype=None if grad_dtype is None else jnp.dtype(grad_dtype))

  def counted(params, state):
    TRACES[key] = TRACES.get(key, 0) + 1
    return inner(params, state)

  return tx, jax.jit(counted, donate_argnums=(0, 1)), key


def fresh(name, kind="dict", dtype="float32", grad_dtype=None):
  tx, step, key = _step(name, kind, dtype, grad_dtype)
  params = make_params(kind, jnp.dtype(dtype))
  return params, tx.init(params), tx, step, key


def assert_state_like(a, b):
  chex.assert_trees_all_equal_structs(a, b)
  chex.assert_trees_all_equal_shapes_and_dtypes(a, b)


# ------------------------------------------------------------ optimisation


# blaq_model's predicted restoring gradient blocks the flips the problem needs
# (its docstring): it stalls, and this records it.
STALLS = {"contrib_blaq_model": "blaq_model blocks code flips and stalls (see its docstring)"}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=STALLS[n])) if n in STALLS
    else n for n in IDS])
def test_optimization_reaches_best_quantized_loss(name):
  case = BY_NAME[name]
  params, state, tx, step, _ = fresh(name)
  spec = spec_for(case, params)
  target = target_like(params)

  one = make_step(case, spec, tx, target)

  def body(carry, _):
    p, s, _, l = one(*carry)
    return (p, s), l

  run = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), None, length=150))
  (params, state), losses = run(params, state)
  q = forward(case, spec, lambda s: s, params, state)
  final = float(loss_fn(target, q))
  assert final < 2e-3 * float(losses[0]), (name, float(losses[0]), final)
  # The full-precision bias converges to its target.
  np.testing.assert_allclose(params["b"], B_TARGET, atol=0.05)
  # The quantized kernel is quantized: at most 2 (1 bit) / 3 (2 bits) levels
  # per scale, so at most that many times the number of scales overall.
  levels = 2 if case.bits == 1 else 3
  scales = 3 if case.per_channel else 1
  assert len(np.unique(np.asarray(q["w"]))) <= levels * scales


# ------------------------------------------- state stability, retrace, donation


@pytest.mark.parametrize("name", IDS)
def test_state_stable_no_retrace_and_donation(name):
  params, state, tx, step, key = fresh(name)
  abstract = jax.eval_shape(tx.init, params)
  assert_state_like(abstract, state)
  # init on ShapeDtypeStruct leaves (e.g. a restore target) works directly too.
  sds = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  assert_state_like(tx.init(sds), state)
  state0 = jax.tree.map(lambda x: x, state)
  before = TRACES.get(key, 0)
  for _ in range(3):
    # Params and the eagerly built state are donated together.
    params, state, updates, _ = step(params, state)
    assert_state_like(state, state0)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
  assert TRACES[key] - before <= 1, "the second jitted step retraced"


# ------------------------------------------------------------- inject_hyperparams

# Every numeric argument of every factory, with non-default values.
INJECT = {
    "laq": (bq.laq, dict(learning_rate=0.02, b1=0.8, b2=0.99, eps=1e-6, clip=0.9)),
    "blaq": (bq.blaq, dict(learning_rate=0.02, a=0.7, b1=0.8, b2=0.99, eps=1e-6, clip=0.9)),
    "ste": (lambda spec, clip: bq.ste(optax.adam(0.02), spec, clip=clip), dict(clip=0.9)),
    "dampening": (bq.add_oscillation_dampening, dict(weight=0.01)),
    "freezing": (bq.freeze_oscillations, dict(threshold=0.3, momentum=0.5)),
    "tracking": (bq.track_oscillations, dict(window=2)),
    "contrib_blaq_model": (contrib.blaq_model, dict(learning_rate=0.02, a=0.7, b1=0.8, b2=0.99,
                                                    eps=1e-6, clip=0.9)),
    "contrib_blaq_reuse": (contrib.blaq_reuse, dict(learning_rate=0.02, a=0.7, b1=0.8, b2=0.99,
                                                    eps=1e-6, clip=0.9)),
}
NEEDS_GRAD_FN = {"blaq", "contrib_blaq_reuse"}


@pytest.mark.parametrize("factory_name", list(INJECT))
def test_inject_hyperparams_every_numeric_arg(factory_name):
  factory, kwargs = INJECT[factory_name]
  params = make_params()
  spec = bq.quant_spec(params, bits=1)
  plain = factory(spec=spec, **kwargs)
  injected = optax.inject_hyperparams(factory)(spec=spec, **kwargs)
  target = target_like(params)
  grad_fn = jax.grad(functools.partial(loss_fn, target))

  def two_steps(tx, p):
    s = tx.init(p)
    kw = {"grad_fn": grad_fn} if factory_name in NEEDS_GRAD_FN else {}
    for _ in range(2):
      u, s = tx.update(grad_fn(bq.ste_quantize_params(p, spec)), s, p, **kw)
      p = optax.apply_updates(p, u)
    return p, s

  p_plain, _ = jax.jit(lambda p: two_steps(plain, p))(params)
  p_inj, s_inj = jax.jit(lambda p: two_steps(injected, p))(params)
  assert set(s_inj.hyperparams) == set(kwargs)
  chex.assert_trees_all_close(p_inj, p_plain, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_equal_structs(s_inj, injected.init(params))


# ---------------------------------------------------------------- wrappers


@pytest.mark.parametrize("name", CORE + CONTRIB)
def test_multi_steps(name):
  """MultiSteps(k=2) applies one step per 2 mini-steps; for the gradient-only
  transforms it equals one step on the mean gradient."""
  case = BY_NAME[name]
  params = make_params()
  spec = spec_for(case, params)
  tx = optax.MultiSteps(case.make(spec), every_k_schedule=2)
  target = target_like(params)
  step = jax.jit(make_step(case, spec, tx, target, wrap=lambda s: s.inner_opt_state))
  state = tx.init(params)
  p1, state, _, _ = step(params, state)
  chex.assert_trees_all_equal(p1, params)  # accumulating: no change yet
  p2, state, _, _ = step(p1, state)
  assert not np.allclose(p2["b"], params["b"])
  p3, state, _, _ = step(p2, state)
  chex.assert_trees_all_equal(p3, p2)
  assert_state_like(state, tx.init(params))
  if not case.grad_fn:
    # The two mini-step gradients were equal (same ŵ), so one plain step matches.
    direct = jax.jit(make_step(case, spec, case.make(spec), target))
    p_direct, *_ = direct(params, case.make(spec).init(params))
    chex.assert_trees_all_close(p2, p_direct, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", CORE + CONTRIB)
def test_apply_if_finite(name):
  case = BY_NAME[name]
  params = make_params()
  spec = spec_for(case, params)
  tx = optax.apply_if_finite(case.make(spec), max_consecutive_errors=3)
  state = tx.init(params)
  bad = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
  kw = {"grad_fn": lambda p: bad} if case.grad_fn else {}
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, **kw))
  updates, state = update(bad, state, params)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  assert int(state.notfinite_count) == 1
  good = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), params)
  kw = {"grad_fn": lambda p: good} if case.grad_fn else {}
  updates, state = jax.jit(lambda g, s, p: tx.update(g, s, p, **kw))(good, state, params)
  assert int(state.notfinite_count) == 0
  assert float(jnp.abs(updates["b"]).sum()) > 0
  if name in LAQ_BLAQ:  # the built-in skip never saw the non-finite step
    types = (bq.LAQState, bq.BLAQState, contrib.BLAQReuseState)
    inner = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, types))
             if isinstance(s, types)]
    assert inner and int(inner[0].skipped) == 0 and int(inner[0].count) == 1


def test_builtin_nonfinite_skip_differs_from_optax():
  """Without apply_if_finite, LAQ skips (and counts) a non-finite step itself,
  where optax.adam would write NaNs into params and state."""
  params = make_params()
  spec = bq.quant_spec(params, bits=1)
  tx = bq.laq(LR, spec)
  state = tx.init(params)
  bad = jax.tree.map(lambda x: jnp.full_like(x, jnp.inf), params)
  updates, new_state = jax.jit(tx.update)(bad, state, params)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  assert int(new_state.skipped) == 1 and int(new_state.count) == 0
  u_adam, _ = optax.adam(LR).update(bad, optax.adam(LR).init(params), params)
  assert not np.isfinite(np.asarray(u_adam["b"])).all()


@pytest.mark.parametrize("name", CORE + CONTRIB)
def test_masked_and_partition(name):
  case = BY_NAME[name]
  params = make_params()
  spec = spec_for(case, params)
  mask = {"w": True, "b": False}
  masked = optax.masked(case.make(spec), mask)
  partition = optax.partition({"q": case.make(spec), "fp": optax.adam(LR)},
                              {"w": "q", "b": "fp"})
  g = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), params)
  kw = {"grad_fn": lambda p: g} if case.grad_fn else {}
  for tx in (masked, partition):
    state = tx.init(params)
    if case.grad_fn:
      with pytest.raises(ValueError, match=r"\.update: .*optax.masked"):
        tx.update(g, state, params, **kw)
      continue
    updates, state2 = jax.jit(lambda g, s, p: tx.update(g, s, p, **kw))(g, state, params)
    assert float(jnp.abs(updates["w"]).sum()) > 0
    assert_state_like(state2, state)
    if case.laq_like:
      assert bq.curvature(state2)["w"].shape == params["w"].shape


# ----------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("name", CORE + CONTRIB)
def test_dtypes(name, dtype):
  ctx = jax.enable_x64(True) if dtype == "float64" else jax.enable_x64(False)
  with ctx:
    params, state, tx, step, _ = fresh(name, dtype=dtype)
    abstract = jax.eval_shape(tx.init, params)
    for _ in range(2):
      params, state, updates, loss = step(params, state)
    assert_state_like(state, abstract)
    for p in jax.tree.leaves(params):
      assert p.dtype == jnp.dtype(dtype) and np.isfinite(np.asarray(p, np.float32)).all()


@pytest.mark.parametrize("name", IDS)
def test_mixed_gradient_and_param_dtypes(name):
  """bf16 gradients for f32 params (as optax.adam accepts)."""
  params, state, tx, step, _ = fresh(name, grad_dtype="bfloat16")
  abstract = jax.eval_shape(tx.init, params)
  params, state, updates, _ = step(params, state)
  assert_state_like(state, abstract)
  chex.assert_trees_all_equal_dtypes(params, make_params())


# -------------------------------------------------------- params trees


@pytest.mark.parametrize("name", CORE + CONTRIB)
def test_params_with_none_empty_tuple_namedtuple(name):
  params, state, tx, step, _ = fresh(name, kind="mixed_containers")
  assert_state_like(jax.eval_shape(tx.init, params), state)
  for _ in range(2):
    params, state, updates, _ = step(params, state)
  assert params["none"] is None and params["empty"] == {} and params["nested"] == ({}, [])
  assert isinstance(params["nt"], NT) and isinstance(params["tuple"], tuple)
  chex.assert_trees_all_equal_structs(params, make_params("mixed_containers"))
  assert not np.allclose(params["nt"].bias, make_params("mixed_containers")["nt"].bias)
  assert_state_like(state, tx.init(make_params("mixed_containers")))


def test_empty_params():
  for case in (BY_NAME["laq1"], BY_NAME["ste_freezing"], BY_NAME["laq_tracking"]):
    tx = case.make({})
    state = tx.init({})
    updates, state = tx.update({}, state, {})
    assert updates == {}


# ---------------------------------------------------------- tree_map_params


@pytest.mark.parametrize("name", IDS)
def test_tree_map_params(name):
  case = BY_NAME[name]
  params = make_params()
  tx = case.make(spec_for(case, params))
  state = tx.init(params)
  mapped = optax.tree.map_params(tx, lambda v: v + 1, state,
                                 transform_non_params=lambda v: v)
  chex.assert_trees_all_equal_structs(mapped, state)
  # Some field like params was mapped (Adam's moments at least).
  changed = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(mapped), jax.tree.leaves(state))]
  assert any(changed)
  # The usual use: shardings for the optimizer state.
  mesh = jax.make_mesh((1,), ("d",), devices=jax.devices()[:1])
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = optax.tree.map_params(tx, lambda _: rep, state,
                                    transform_non_params=lambda _: rep)
  placed = jax.device_put(state, shardings)
  chex.assert_trees_all_equal(placed, state)


# ------------------------------------------------------------- orbax


@pytest.mark.parametrize("name", CORE + CONTRIB)
def test_orbax_round_trip_continues_bit_identically(name, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  params, state, tx, step, _ = fresh(name)
  params, state, _, _ = step(params, state)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "ckpt", {"params": params, "state": state})
  ckpt.wait_until_finished()
  abstract = {"params": jax.eval_shape(lambda: params),
              "state": jax.eval_shape(tx.init, params)}
  restored = ckpt.restore(tmp_path / "ckpt", abstract)
  ckpt.close()
  chex.assert_trees_all_equal(restored["state"], state)
  chex.assert_trees_all_equal_structs(restored["state"], state)
  a = step(jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, state))
  b = step(restored["params"], restored["state"])
  chex.assert_trees_all_equal(a[0], b[0])
  chex.assert_trees_all_equal(a[1], b[1])
