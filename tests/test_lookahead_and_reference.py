"""LAQ against the reference code's update rule, and BLAQ's lookahead schedule."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blaq_jax as bq
from helpers import bit_exact

B1, B2, EPS = 0.9, 0.999, 1e-8


def hinge_problem(seed=0):
  """A 6-16-3 MLP with the reference code's squared hinge loss on ±1 targets."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(64, 6))
  labels = rng.integers(0, 3, size=64)
  t = np.where(np.arange(3)[None] == labels[:, None], 1.0, -1.0)
  params = {"l1": {"kernel": rng.normal(size=(6, 16)) * 0.3, "bias": np.zeros(16)},
            "l2": {"kernel": rng.normal(size=(16, 3)) * 0.3, "bias": np.zeros(3)}}

  def loss(p):
    h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    y = h @ p["l2"]["kernel"] + p["l2"]["bias"]
    return jnp.mean(jnp.maximum(0.0, 1.0 - t * y) ** 2)

  return jax.tree.map(jnp.asarray, params), loss


# ------------------------------------------- the LAQ reference rule, in numpy

def reference_laq(params, loss, lr, steps, ternary):
  """The LAQ reference code's step (hou-laq-reference-notes), float64 numpy.

  Curvature from the raw second moment of the previous step; binary: closed
  form; ternary: warm-started from the previous codes, alternate until
  |Δα| < 1e-6, at most 10 rounds, threshold α/2; Lasagne's Adam; quantized
  latent weights clipped to [-1, 1]. Returns the codes used at every step.
  """
  grad = jax.grad(loss)
  flat, treedef = jax.tree.flatten(params)
  w = [np.asarray(x, np.float64) for x in flat]
  quantized = [x.ndim >= 2 for x in w]
  m = [np.zeros_like(x) for x in w]
  acc = [np.zeros_like(x) for x in w]
  codes = [np.where(x >= 0, 1.0, -1.0) for x in w]  # ternary: start from full support
  history = []
  for t in range(1, steps + 1):
    q = []
    for i, x in enumerate(w):
      if not quantized[i]:
        q.append(x)
        continue
      d = np.sqrt(acc[i]) + 1e-8
      if not ternary:
        codes[i] = np.where(x >= 0, 1.0, -1.0)
        alpha = np.sum(d * np.abs(x)) / np.sum(d)
      else:
        alpha, codes[i] = reference_ternary(x, d, codes[i])
      q.append(alpha * codes[i])
    history.append([c.copy() for c, k in zip(codes, quantized) if k])
    g = [np.asarray(v, np.float64) for v in jax.tree.leaves(grad(treedef.unflatten(q)))]
    lr_t = lr * np.sqrt(1 - B2 ** t) / (1 - B1 ** t)
    for i in range(len(w)):
      m[i] = B1 * m[i] + (1 - B1) * g[i]
      acc[i] = B2 * acc[i] + (1 - B2) * g[i] ** 2
      w[i] = w[i] - lr_t * m[i] / (np.sqrt(acc[i]) + EPS)
      if quantized[i]:
        w[i] = np.clip(w[i], -1.0, 1.0)
  return history


def reference_ternary(w, d, prev_codes):
  """The reference code's ternary solver: warm-started from ``prev_codes``,
  alternate until ``|Δα| < 1e-6``, at most 10 rounds, threshold ``α/2``.
  Returns ``(alpha, codes)``."""
  b = prev_codes
  alpha = np.sum(np.abs(b * d * w)) / np.sum(np.abs(b * d))
  for _ in range(10):
    b = np.where(np.abs(w) > alpha / 2, np.sign(w), 0.0)
    new = np.sum(np.abs(b * d * w)) / np.sum(np.abs(b * d))
    done = abs(new - alpha) < 1e-6
    alpha = new
    if done:
      break
  return alpha, np.where(np.abs(w) > alpha / 2, np.sign(w), 0.0)


def reference_ternary_error(w, d, prev_codes):
  """The weighted error ``Σ D (w - ŵ)²`` of the reference's ternary solver."""
  alpha, b = reference_ternary(w, d, prev_codes)
  return float(np.sum(d * (w - alpha * b) ** 2))


def laq_trajectory(params, loss, spec, steps):
  """LAQ at lr 1e-2: per step, the params and state after it and the ``ŵ``
  its gradient was taken at."""
  tx = bq.laq(1e-2, spec)

  @jax.jit
  def step(params, state):
    q = bq.quantize_params(params, spec, state=state)
    updates, state = tx.update(jax.grad(loss)(q), state, params)
    return optax.apply_updates(params, updates), state, q

  state, out = tx.init(params), []
  for _ in range(steps):
    params, state, q = step(params, state)
    out.append((params, state, q))
  return out


def test_laq_follows_the_reference_rule_binary(x64):
  params, loss = hinge_problem()
  spec = bq.quant_spec(params, bits=1)
  ours = []
  for _, _, q in laq_trajectory(params, loss, spec, 40):
    ours.append([np.sign(np.asarray(q["l1"]["kernel"])), np.sign(np.asarray(q["l2"]["kernel"]))])
  ref = reference_laq(hinge_problem()[0], loss, 1e-2, 40, ternary=False)
  agree = sum(int(np.sum(a == b)) for o, r in zip(ours, ref) for a, b in zip(o, r))
  total = sum(a.size for o in ours for a in o)
  assert agree / total >= 0.999, (agree, total)


def test_laq_ternary_projects_at_least_as_well_as_the_reference_solver(x64):
  """The update rule is the reference's; the projection is not meant to be:
  the reference's ternary solver alternates from the last codes and stops at
  the nearest fixed point, blaq_jax's searches for a better one. So along
  LAQ's trajectory every projection must be as good as the reference
  solver's, started from the same last codes, at the same ``w`` and ``D``
  (scaling ``D`` changes neither), up to the warm projection's tolerance of
  1.001 (one round after the search need not reach the fixed point)."""
  params, loss = hinge_problem()
  spec = bq.quant_spec(params, bits=2, scheme="ternary")
  prev = None
  used_zero = False
  for t, (p_t, state, _) in enumerate(laq_trajectory(params, loss, spec, 40)):
    q = bq.quantize_params(p_t, spec, state=state)
    d = bq.curvature(state)
    codes = {}
    for name in ("l1", "l2"):
      w = np.asarray(p_t[name]["kernel"])
      dn = np.asarray(d[name]["kernel"])
      qn = np.asarray(q[name]["kernel"])
      codes[name] = np.sign(qn)
      used_zero |= bool(np.any(qn == 0))
      ours = float(np.sum(dn * (w - qn) ** 2))
      start = prev[name] if prev else np.where(w >= 0, 1.0, -1.0)
      assert ours <= reference_ternary_error(w, dn, start) * 1.001, (t, name)
    prev = codes
  assert used_zero  # the ternary codes really use zero


# ------------------------------------------------------- the lookahead schedule

def mlp(seed=0):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  params = {"l1": {"kernel": jax.random.normal(k1, (8, 16)) * 0.3, "bias": jnp.zeros(16)},
            "l2": {"kernel": jax.random.normal(k2, (16, 3)) * 0.3, "bias": jnp.zeros(3)}}
  x = jax.random.normal(k3, (32, 8))
  y = jax.random.randint(k4, (32,), 0, 3)

  def loss(p):
    h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    return optax.softmax_cross_entropy_with_integer_labels(
        h @ p["l2"]["kernel"] + p["l2"]["bias"], y).mean()

  return params, loss


def trajectory(tx, spec, params, loss, steps, calls=None):
  def grad_fn(p):
    if calls is not None:
      jax.debug.callback(lambda: calls.append(1))
    return jax.grad(loss)(p)

  @jax.jit
  def step(params, state):
    q = bq.quantize_params(params, spec, state=state)
    updates, state = tx.update(jax.grad(loss)(q), state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  state, out = tx.init(params), []
  for _ in range(steps):
    params, state = step(params, state)
    out.append((params, state))
  return out


def assert_same(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


@bit_exact
@pytest.mark.parametrize("bits", [1, 2])
def test_never_active_is_laq_and_always_active_is_blaq(bits):
  params, loss = mlp(bits)
  spec = bq.quant_spec(params, bits=bits)
  laq = trajectory(bq.laq(1e-2, spec), spec, params, loss, 12)
  never = trajectory(bq.blaq(1e-2, spec, lookahead_schedule=lambda c: False),
                     spec, params, loss, 12)
  for (p1, s1), (p2, s2) in zip(laq, never):
    assert_same(p1, p2)
    for field in ("count", "mu", "nu", "scale", "skipped"):
      assert_same(getattr(s1, field), getattr(s2, field))
  every = trajectory(bq.blaq(1e-2, spec), spec, params, loss, 12)
  always = trajectory(bq.blaq(1e-2, spec, lookahead_schedule=lambda c: c >= 0),
                      spec, params, loss, 12)
  assert_same(every, always)
  assert not np.array_equal(every[-1][0]["l1"]["kernel"], laq[-1][0]["l1"]["kernel"])


def test_grad_fn_runs_exactly_on_the_active_steps(x64):
  params, loss = mlp()
  spec = bq.quant_spec(params, bits=1)
  schedule = bq.periodic_lookahead(3, steps_per_epoch=2)  # epoch 2 of every 3: steps 4, 5, 10, 11
  calls = []
  sched = trajectory(bq.blaq(1e-2, spec, lookahead_schedule=schedule), spec, params, loss,
                     12, calls)
  assert len(calls) == 4
  laq = trajectory(bq.laq(1e-2, spec), spec, params, loss, 12)
  # Steps 0-3 are LAQ's bit for bit; step 4 is a two-stage step from the same point.
  for t in range(4):
    assert_same(sched[t][0], laq[t][0])
  assert not np.array_equal(sched[4][0]["l1"]["kernel"], laq[4][0]["l1"]["kernel"])
  one_blaq = bq.blaq(1e-2, spec)
  state = sched[3][1]
  p = sched[3][0]
  q = bq.quantize_params(p, spec, state=state)
  u, s = jax.jit(lambda p, s: one_blaq.update(jax.grad(loss)(q), s, p,
                                              grad_fn=jax.grad(loss)))(p, state)
  np.testing.assert_allclose(optax.apply_updates(p, u)["l1"]["kernel"],
                             sched[4][0]["l1"]["kernel"], rtol=1e-9, atol=1e-11)


def host_scheduled(tx, spec, params, loss, steps, schedule, calls):
  """BLAQ decided on the host: two compiled steps, ``grad_fn=None`` when off."""
  def grad_fn(p):
    jax.debug.callback(lambda: calls.append(1))
    return jax.grad(loss)(p)

  @functools.partial(jax.jit, static_argnames="active", donate_argnums=(0, 1))
  def step(params, state, active):
    q = bq.quantize_params(params, spec, state=state)
    updates, state = tx.update(jax.grad(loss)(q), state, params,
                               grad_fn=grad_fn if active else None)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(jnp.copy, params)
  state, out = jax.tree.map(jnp.copy, tx.init(params)), []
  for t in range(steps):
    params, state = step(params, state, bool(schedule(t)))
    out.append(jax.tree.map(np.asarray, (params, state)))
  return out


@bit_exact
@pytest.mark.parametrize("bits", [1, 2])
def test_host_schedule_off_steps_are_laq_and_on_steps_are_blaq(bits, x64):
  params, loss = mlp(bits)
  spec = bq.quant_spec(params, bits=bits)
  schedule = bq.periodic_lookahead(3, steps_per_epoch=2)  # steps 4, 5, 10, 11
  calls = []
  host = host_scheduled(bq.blaq(1e-2, spec), spec, params, loss, 12, schedule, calls)
  assert len(calls) == 4   # grad_fn ran on the active steps only
  in_graph = trajectory(bq.blaq(1e-2, spec, lookahead_schedule=schedule), spec, params, loss,
                        12)
  for (p1, s1), (p2, s2) in zip(host, in_graph):
    assert_same(p1, p2)
    assert_same(s1, s2)
  # The off steps from the start are LAQ's, bit for bit (params and LAQ's fields).
  laq = trajectory(bq.laq(1e-2, spec), spec, params, loss, 4)
  for (p1, s1), (p2, s2) in zip(host[:4], laq):
    assert_same(p1, p2)
    for field in ("count", "mu", "nu", "scale", "skipped"):
      assert_same(getattr(s1, field), getattr(s2, field))


@bit_exact
def test_grad_fn_none_is_laqs_step_under_chain_and_nnx_style_kwargs(x64):
  params, loss = mlp()
  spec = bq.quant_spec(params, bits=2)
  tx = optax.chain(optax.identity(), optax.inject_hyperparams(bq.blaq)(
      learning_rate=1e-2, spec=spec, a=0.6))
  laq = bq.laq(1e-2, spec)
  s_blaq, s_laq = tx.init(params), laq.init(params)
  g = jax.grad(loss)(bq.quantize_params(params, spec, state=s_laq))
  u1, _ = tx.update(g, s_blaq, params, grad_fn=None)
  u2, _ = laq.update(g, s_laq, params)
  assert_same(u1, u2)


def test_periodic_lookahead_schedule():
  f = bq.periodic_lookahead(5, steps_per_epoch=10)
  active = [bool(f(jnp.int32(t))) for t in range(100)]
  assert active == [40 <= t < 50 or 90 <= t < 100 for t in range(100)]
  g = bq.periodic_lookahead(5, steps_per_epoch=10, phase=0)
  assert [bool(g(jnp.int32(t))) for t in range(100)] == [t < 10 or 50 <= t < 60
                                                         for t in range(100)]
  assert [bool(bq.periodic_lookahead(1)(t)) for t in range(3)] == [True] * 3
  for kwargs, match in [(dict(m=0), "m must"), (dict(m=2, steps_per_epoch=0), "steps_per_epoch"),
                        (dict(m=5, phase=5), "phase"), (dict(m=2.0), "m must")]:
    with pytest.raises(ValueError, match=match):
      bq.periodic_lookahead(**kwargs)
  with pytest.raises(TypeError, match="lookahead_schedule"):
    bq.blaq(1e-2, {}, lookahead_schedule=5)


def test_schedule_under_inject_hyperparams_and_chain(x64):
  params, loss = mlp()
  spec = bq.quant_spec(params, bits=1)
  sched = bq.periodic_lookahead(2)
  plain = trajectory(bq.blaq(1e-2, spec, lookahead_schedule=sched), spec, params, loss, 5)
  wrapped = optax.chain(optax.identity(), optax.inject_hyperparams(bq.blaq)(
      learning_rate=1e-2, spec=spec, a=0.6, lookahead_schedule=sched))
  chained = trajectory(wrapped, spec, params, loss, 5)
  # atol: see test_inject_hyperparams (a rate in the state rounds differently).
  chex.assert_trees_all_close([p for p, _ in plain], [p for p, _ in chained],
                              rtol=1e-12, atol=1e-10)


def test_forward_weights_are_the_ones_the_update_assumed():
  """quantize_params(state=) uses the committed scale, the converged Q_D(w)."""
  params, loss = mlp()
  spec = bq.quant_spec(params, bits=3)
  params, state = trajectory(bq.blaq(1e-2, spec), spec, params, loss, 6)[-1]
  q = bq.quantize_params(params, spec, state=state)
  cold = bq.quantize_params(params, spec, bq.curvature(state))
  d = bq.curvature(state)
  for path in (("l1", "kernel"), ("l2", "kernel")):
    w, dd = params[path[0]][path[1]], d[path[0]][path[1]]
    err_state = float(jnp.sum(dd * (w - q[path[0]][path[1]]) ** 2))
    err_cold = float(jnp.sum(dd * (w - cold[path[0]][path[1]]) ** 2))
    assert err_state <= err_cold * (1 + 1e-3)
  assert q["l1"]["bias"] is params["l1"]["bias"]
