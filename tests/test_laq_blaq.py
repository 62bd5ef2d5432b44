"""LAQ and BLAQ transforms: reference math, a=1 invariant, optax integration."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blaq_jax as bq
from helpers import bit_exact

B1, B2, EPS = 0.9, 0.999, 1e-8


# ----------------------------------------------------------------- problems

def mlp_problem(seed=0):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  params = {
      "l1": {"kernel": jax.random.normal(k1, (8, 16)) * 0.3, "bias": jnp.zeros(16)},
      "l2": {"kernel": jax.random.normal(k2, (16, 3)) * 0.3, "bias": jnp.zeros(3)},
  }
  x = jax.random.normal(k3, (32, 8))
  y = jax.random.randint(k4, (32,), 0, 3)

  def loss(p):
    h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    logits = h @ p["l2"]["kernel"] + p["l2"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, loss


def make_step(tx, spec, loss):

  def step(params, state):
    q = bq.quantize_params(params, spec, state=state)
    g = jax.grad(loss)(q)
    updates, state = tx.update(g, state, params, grad_fn=jax.grad(loss))
    return optax.apply_updates(params, updates), state, q

  return step


def run(tx, spec, params, loss, steps):
  step = jax.jit(make_step(tx, spec, loss))
  state = tx.init(params)
  history = []
  for _ in range(steps):
    params, state, q = step(params, state)
    history.append((params, q))
  return params, state, history


# ------------------------------------------------------- float64 references

def np_quantize(w, d):
  """Binary loss-aware projection (closed form)."""
  alpha = np.sum(d * np.abs(w)) / np.sum(d)
  return alpha * np.where(w >= 0, 1.0, -1.0)


def reference(loss, params, quantized, lr, steps, a=None, clip=1.0):
  """LAQ (a is None) or BLAQ, written from the paper's equations in numpy."""
  names = list(params)
  w = {k: np.asarray(params[k], np.float64) for k in names}
  m = {k: np.zeros_like(v) for k, v in w.items()}
  v = {k: np.zeros_like(x) for k, x in w.items()}
  d = {k: np.ones_like(x) for k, x in w.items()}
  grad = jax.grad(loss)

  def g_at(p):
    return {k: np.asarray(x, np.float64) for k, x in grad(p).items()}

  def q_of(p, dd):
    return {k: np_quantize(p[k], dd[k]) if k in quantized else p[k] for k in names}

  def latent_step(k, m_new, den, t):
    new = w[k] - lr * (m_new / (1 - B1 ** t)) / den
    return np.clip(new, -clip, clip) if k in quantized else new

  trail = []
  for t in range(1, steps + 1):
    g = g_at(q_of(w, d))
    m1 = {k: B1 * m[k] + (1 - B1) * g[k] for k in names}
    v1 = {k: B2 * v[k] + (1 - B2) * g[k] ** 2 for k in names}
    d1 = {k: np.sqrt(v1[k] / (1 - B2 ** t)) + EPS for k in names}
    if a is None:  # LAQ
      w = {k: latent_step(k, m1[k], d1[k], t) for k in names}
      m, v, d = m1, v1, d1
    else:  # BLAQ, Eq. 4-10
      w_star = {k: latent_step(k, m1[k], d1[k], t) for k in names}
      g_star = g_at(q_of(w_star, d1))                              # Eq. 5-6
      g_mix = {k: a * g[k] + (1 - a) * g_star[k] for k in names}    # Eq. 9
      v_star = {k: B2 * v[k] + (1 - B2) * g_star[k] ** 2 for k in names}
      d_star = {k: np.sqrt(v_star[k] / (1 - B2 ** t)) + EPS for k in names}
      d = {k: a * d1[k] + (1 - a) * d_star[k] for k in names}      # Eq. 10
      m = {k: B1 * m[k] + (1 - B1) * g_mix[k] for k in names}
      v = {k: a * v1[k] + (1 - a) * v_star[k] for k in names}
      w = {k: latent_step(k, m[k], d[k], t) for k in names}        # Eq. 8
    trail.append((dict(w), q_of(w, d)))
  return trail


def quadratic_problem():
  rng = np.random.default_rng(0)
  target = {"k": rng.normal(size=(3, 4)) * 0.2, "b": rng.normal(size=4)}
  scale = {"k": rng.uniform(0.5, 5, size=(3, 4)), "b": rng.uniform(0.5, 5, size=4)}

  def loss(p):
    return sum(jnp.sum(scale[k] * (p[k] - target[k]) ** 2) for k in p) + jnp.sum(
        p["k"] ** 3) * 0.3

  params = {"k": rng.normal(size=(3, 4)) * 0.3, "b": np.zeros(4)}
  return params, loss


@pytest.mark.parametrize("a", [None, 0.6, 0.0])
def test_matches_numpy_reference(a, x64):
  params, loss = quadratic_problem()
  params = jax.tree.map(jnp.asarray, params)
  spec = {"k": bq.QuantSpec(1), "b": None}
  lr = 0.05
  tx = bq.laq(lr, spec) if a is None else bq.blaq(lr, spec, a=a)
  _, _, history = run(tx, spec, params, loss, steps=8)
  trail = reference(loss, params, {"k"}, lr, steps=8, a=a)
  for (p, _), (w_ref, _) in zip(history, trail):
    for k in ("k", "b"):
      np.testing.assert_allclose(p[k], w_ref[k], rtol=1e-10, atol=1e-12)
  # The final quantized weights the next forward pass would use.
  state_q = history[-1][0]
  assert np.all(np.abs(state_q["k"]) <= 1.0)


@bit_exact
def test_blaq_a1_is_laq_bit_for_bit():
  params, loss = mlp_problem()
  spec = bq.quant_spec(params, bits=1)
  _, s_laq, h_laq = run(bq.laq(1e-2, spec), spec, params, loss, steps=20)
  _, s_blaq, h_blaq = run(bq.blaq(1e-2, spec, a=1.0), spec, params, loss, steps=20)
  chex.assert_trees_all_equal(h_laq, h_blaq)
  for field in ("count", "mu", "nu", "scale", "skipped"):
    chex.assert_trees_all_equal(getattr(s_laq, field), getattr(s_blaq, field))
  # LAQ recomputes D from its moment where BLAQ stores D_mix = D1: equal up to
  # the rounding of b2^t (XLA's pow differs by an ulp between graphs).
  chex.assert_trees_all_close(bq.curvature(s_laq), bq.curvature(s_blaq), rtol=1e-5)
  # And a < 1 really changes the trajectory.
  _, _, h_06 = run(bq.blaq(1e-2, spec, a=0.6), spec, params, loss, steps=20)
  assert not np.array_equal(h_06[-1][0]["l1"]["kernel"], h_laq[-1][0]["l1"]["kernel"])


@bit_exact
def test_blaq_a1_is_laq_bit_for_bit_2bit_per_channel():
  params, loss = mlp_problem(1)
  spec = bq.quant_spec(params, bits=2, per_channel=True)
  _, _, h_laq = run(bq.laq(3e-3, spec), spec, params, loss, steps=20)
  _, _, h_blaq = run(bq.blaq(3e-3, spec, a=1.0), spec, params, loss, steps=20)
  chex.assert_trees_all_equal(h_laq, h_blaq)


def test_unquantized_leaves_take_the_adam_step():
  params, loss = mlp_problem()
  spec = jax.tree.map(lambda _: None, params)
  tx = bq.laq(1e-2, spec, clip=None)
  adam = optax.adam(1e-2, b1=B1, b2=B2, eps=EPS)

  @jax.jit
  def steps(params):
    p1, s1 = params, tx.init(params)
    p2, s2 = params, adam.init(params)
    for _ in range(5):
      u1, s1 = tx.update(jax.grad(loss)(p1), s1, p1)
      p1 = optax.apply_updates(p1, u1)
      u2, s2 = adam.update(jax.grad(loss)(p2), s2, p2)
      p2 = optax.apply_updates(p2, u2)
    return p1, p2

  p1, p2 = steps(params)
  chex.assert_trees_all_close(p1, p2, rtol=1e-5, atol=1e-7)


def test_latent_weights_are_clipped():
  params = {"k": jnp.array([[0.95, -0.95]])}
  spec = {"k": bq.QuantSpec(1)}
  tx = bq.laq(0.5, spec, clip=1.0)
  state = tx.init(params)
  u, state = tx.update({"k": jnp.array([[-1.0, 1.0]])}, state, params)
  np.testing.assert_allclose(optax.apply_updates(params, u)["k"], [[1.0, -1.0]], rtol=1e-6)


# ------------------------------------------------------------- grad_fn use

def test_grad_fn_called_exactly_once_at_the_trial_weights():
  params, loss = mlp_problem()
  spec = bq.quant_spec(params, bits=1)
  # Without the skip, grad_fn is traced outside any lax.cond, so the test can
  # look at its argument from the same trace.
  tx = bq.blaq(1e-2, spec, skip_nonfinite=False)
  state = tx.init(params)
  seen = []

  def grad_fn(p):
    seen.append(p)
    return jax.grad(loss)(p)

  g = jax.grad(loss)(bq.quantize_params(params, spec))

  @jax.jit
  def update(g, state, params):
    tx.update(g, state, params, grad_fn=grad_fn)
    return seen[0]  # the weights grad_fn was called with (same trace)

  trial = update(g, state, params)
  assert len(seen) == 1
  # The quantized leaves it saw are binary codes times one scale per tensor.
  assert len(np.unique(np.abs(np.asarray(trial["l1"]["kernel"])))) == 1
  gb = np.asarray(g["l1"]["bias"])  # unquantized: w* = w - lr g / (|g| + eps) at t = 1
  np.testing.assert_allclose(trial["l1"]["bias"], -1e-2 * gb / (np.abs(gb) + EPS), rtol=1e-4)


def test_grad_fn_none_is_laqs_step_and_a_bad_grad_fn_is_a_clear_error():
  params, loss = mlp_problem()
  spec = bq.quant_spec(params, bits=1)
  tx = bq.blaq(1e-2, spec)
  g = jax.grad(loss)(params)
  u_blaq, _ = tx.update(g, tx.init(params), params)          # no grad_fn: LAQ's step
  u_laq, _ = bq.laq(1e-2, spec).update(g, bq.laq(1e-2, spec).init(params), params)
  chex.assert_trees_all_equal(u_blaq, u_laq)
  with pytest.raises(TypeError, match="grad_fn must be a function"):
    tx.update(g, tx.init(params), params, grad_fn="not a function")
  with pytest.raises(ValueError, match="params"):
    tx.update(jax.grad(loss)(params), tx.init(params), grad_fn=jax.grad(loss))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("a", [-0.1, 1.5])
def test_a_out_of_range(a):
  with pytest.raises(ValueError, match="a must be in"):
    bq.blaq(1e-3, {}, a=a)


def test_integer_params_are_named():
  params = {"w": jnp.ones((2, 2)), "step": jnp.zeros((), jnp.int32)}
  spec = {"w": bq.QuantSpec(1), "step": None}
  for tx in (bq.laq(1e-3, spec), bq.blaq(1e-3, spec)):
    with pytest.raises(TypeError, match="'step'"):
      tx.init(params)


def test_spec_tree_mismatch_is_named():
  params, _ = mlp_problem()
  spec = bq.quant_spec({"l1": params["l1"]}, bits=1)
  with pytest.raises(ValueError, match="only in params: \\['l2/bias', 'l2/kernel'\\]"):
    bq.laq(1e-3, spec).init(params)


def test_bad_hyperparameters():
  with pytest.raises(ValueError, match="b1"):
    bq.laq(1e-3, {}, b1=1.0)
  with pytest.raises(ValueError, match="clip"):
    bq.blaq(1e-3, {}, clip=0.0)


# ------------------------------------------------------- non-finite skipping

@pytest.mark.parametrize("where", ["grads", "grad_fn"])
def test_non_finite_step_is_skipped_and_counted(where):
  params, loss = mlp_problem()
  spec = bq.quant_spec(params, bits=1)
  tx = bq.blaq(1e-2, spec)
  step = jax.jit(make_step(tx, spec, loss))
  state = tx.init(params)
  params, state, _ = step(params, state)  # one good step first

  def poison(tree):
    return jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), tree)

  g = jax.grad(loss)(bq.quantize_params(params, spec, state=state))
  grad_fn = jax.grad(loss)
  if where == "grads":
    g = poison(g)
  else:
    grad_fn = lambda p: poison(jax.grad(loss)(p))
  updates, new_state = jax.jit(
      lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))(g, state, params)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, 0)
  assert int(new_state.skipped) == 1
  assert int(new_state.count) == int(state.count) == 1
  chex.assert_trees_all_equal((state.mu, state.nu, state.curvature, state.scale),
                              (new_state.mu, new_state.nu, new_state.curvature, new_state.scale))
  # Training goes on from there.
  params, state, _ = step(params, new_state)
  assert int(state.count) == 2 and int(state.skipped) == 1


def test_laq_skips_non_finite():
  params = {"w": jnp.ones((2, 2))}
  tx = bq.laq(1e-2, {"w": bq.QuantSpec(1)})
  state = tx.init(params)
  updates, state = tx.update({"w": jnp.full((2, 2), jnp.inf)}, state, params)
  np.testing.assert_array_equal(updates["w"], 0)
  assert int(state.skipped) == 1 and int(state.count) == 0


# ------------------------------------------------------------ optax plumbing

def test_jit_does_not_retrace():
  params, loss = mlp_problem()
  spec = bq.quant_spec(params, bits=1)
  tx = bq.blaq(1e-2, spec)
  traces = []

  def step(p, s):
    traces.append(1)
    return make_step(tx, spec, loss)(p, s)

  step = jax.jit(step)
  state = tx.init(params)
  for _ in range(3):
    params, state, _ = step(params, state)
  assert len(traces) == 1


def test_chain_with_clipping_and_schedule(x64):
  # float64: a tiny (noise-level) gradient entry of this MLP makes Adam's
  # normalised step sensitive to the last float32 bit.
  params, loss = mlp_problem()
  spec = bq.quant_spec(params, bits=1)
  sched = optax.linear_schedule(1e-2, 0.0, 10)
  tx = optax.chain(optax.clip_by_global_norm(1e-3), bq.blaq(sched, spec))
  _, state, hist = run(tx, spec, params, loss, steps=3)
  # Same as clipping by hand and a constant rate per step.

  @jax.jit
  def ref_step(p, ref_state, lr):
    inner = bq.blaq(lr, spec)
    q = bq.quantize_params(p, spec, state=ref_state)
    g = jax.grad(loss)(q)
    norm = optax.tree.norm(g)
    g = jax.tree.map(lambda x: x * jnp.minimum(1.0, 1e-3 / norm), g)
    u, ref_state = inner.update(g, ref_state, p, grad_fn=jax.grad(loss))
    return optax.apply_updates(p, u), ref_state

  p, ref_state = params, bq.blaq(1.0, spec).init(params)
  for t in range(3):
    p, ref_state = ref_step(p, ref_state, sched(t))
    # rtol: the scheduled rate is a float32 inside the chain.
    chex.assert_trees_all_close(p, hist[t][0], rtol=1e-7, atol=1e-9)
  assert int(state[1].count) == 3


def test_inject_hyperparams(x64):
  params, loss = mlp_problem()
  spec = bq.quant_spec(params, bits=1)
  tx = optax.inject_hyperparams(bq.blaq)(learning_rate=1e-2, spec=spec, a=0.6)
  _, state, hist = run(tx, spec, params, loss, steps=3)
  _, _, hist_ref = run(bq.blaq(1e-2, spec, a=0.6), spec, params, loss, steps=3)
  # A rate in the state and a rate folded into the graph round differently; Adam
  # scales that rounding up where a gradient is near 0, so atol is near the
  # weights' rounding (their scale is 1e-2).
  chex.assert_trees_all_close(hist, hist_ref, rtol=1e-10, atol=1e-10)
  # The rate can be changed in the state.
  state.hyperparams["learning_rate"] = jnp.array(0.0)
  p = hist[-1][0]
  new_p, _, _ = jax.jit(make_step(tx, spec, loss))(p, state)
  chex.assert_trees_all_equal(new_p, p)


def test_curvature_is_found_everywhere():
  params, loss = mlp_problem()
  spec = bq.quant_spec(params, bits=1)
  g = jax.grad(loss)(params)

  def d_of(tx, **kw):
    state = tx.init(params)
    _, state = tx.update(g, state, params, **kw)
    return bq.curvature(state)

  alone = d_of(bq.laq(1e-2, spec))
  assert alone["l1"]["bias"] is None
  expected = np.sqrt(np.asarray(g["l1"]["kernel"]) ** 2) + EPS  # t = 1
  # rtol: 1 - b2 in float32 is not exactly 0.001 (the same holds in optax.adam).
  np.testing.assert_allclose(alone["l1"]["kernel"], expected, rtol=2e-5)
  chained = d_of(optax.chain(optax.identity(), bq.laq(1e-2, spec)))
  injected = d_of(optax.inject_hyperparams(bq.laq)(learning_rate=1e-2, spec=spec))
  blaq_in = d_of(optax.chain(optax.inject_hyperparams(bq.blaq)(learning_rate=1e-2, spec=spec)),
                 grad_fn=jax.grad(loss))
  labels = {"l1": {"kernel": "q", "bias": "fp"}, "l2": {"kernel": "q", "bias": "fp"}}
  multi = d_of(optax.multi_transform(
      {"q": bq.laq(1e-2, spec), "fp": optax.adam(1e-2)}, labels))
  for d in (chained, injected, multi):
    chex.assert_trees_all_close(alone, d, rtol=0 if d is not injected else 2e-5, atol=0)
    assert d["l2"]["bias"] is None
  assert blaq_in["l2"]["kernel"].shape == (16, 3)
  with pytest.raises(ValueError, match="no LAQ/BLAQ state"):
    bq.curvature(optax.adam(1e-3).init(params))


def test_blaq_refuses_masked_params():
  params, loss = mlp_problem()
  spec = bq.quant_spec(params, bits=1)
  labels = {"l1": {"kernel": "q", "bias": "fp"}, "l2": {"kernel": "q", "bias": "fp"}}
  tx = optax.multi_transform({"q": bq.blaq(1e-2, spec), "fp": optax.adam(1e-2)}, labels)
  state = tx.init(params)
  with pytest.raises(ValueError, match="MaskedNode"):
    tx.update(jax.grad(loss)(params), state, params, grad_fn=jax.grad(loss))


# ------------------------------------------------------- the paper's Fig. 1

def toy_flips(tx_factory, lr, w0=(-0.1, 0.1), steps=600):
  """1-bit weights on 5(w1-0.054)^2 + (w2+0.055)^2; returns sign history."""

  def loss(p):
    w = p["w"]
    return 5 * (w[0] - 0.054) ** 2 + (w[1] + 0.055) ** 2

  spec = {"w": bq.QuantSpec(1)}
  tx = tx_factory(lr, spec)
  params = {"w": jnp.asarray(w0, jnp.float32)}
  state = tx.init(params)

  def body(carry, _):
    p, s = carry
    p, s, q = make_step(tx, spec, loss)(p, s)
    return (p, s), jnp.sign(q["w"])

  _, signs = jax.lax.scan(body, (params, state), None, length=steps)
  changed = np.any(np.diff(np.asarray(signs), axis=0) != 0, axis=1)
  last_change = int(np.nonzero(changed)[0].max()) + 1 if changed.any() else 0
  return int(changed[-100:].sum()), last_change


def test_fig1_laq_zig_zags_where_blaq_settles():
  lr = 0.1
  laq_flips, laq_last = toy_flips(lambda lr, s: bq.laq(lr, s), lr)
  blaq_flips, blaq_last = toy_flips(lambda lr, s: bq.blaq(lr, s, a=0.6), lr)
  # LAQ: the quantized weights still flip in the last 100 of 600 steps.
  assert laq_flips >= 5 and laq_last > 500, (laq_flips, laq_last)
  # BLAQ: they settle early and stay put.
  assert blaq_flips == 0 and blaq_last < 50, (blaq_flips, blaq_last)


def test_skip_nonfinite_can_be_turned_off():
  params = {"w": jnp.ones((2, 2))}
  spec = {"w": bq.QuantSpec(1)}
  for tx in (bq.laq(1e-2, spec, skip_nonfinite=False),
             bq.blaq(1e-2, spec, skip_nonfinite=False)):
    state = tx.init(params)
    g = {"w": jnp.full((2, 2), jnp.nan)}
    updates, state = tx.update(g, state, params, grad_fn=lambda p: g)
    assert np.isnan(np.asarray(updates["w"])).all()
    assert int(state.skipped) == 0 and int(state.count) == 1
