"""LAQ against the reference code's update rule, and BLAQ's lookahead schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blaq_jax as bq

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
        b = codes[i]
        alpha = np.sum(np.abs(b * d * x)) / np.sum(np.abs(b * d))
        for _ in range(10):
          b = np.where(np.abs(x) > alpha / 2, np.sign(x), 0.0)
          new = np.sum(np.abs(b * d * x)) / np.sum(np.abs(b * d))
          done = abs(new - alpha) < 1e-6
          alpha = new
          if done:
            break
        codes[i] = np.where(np.abs(x) > alpha / 2, np.sign(x), 0.0)
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


@pytest.mark.parametrize("ternary", [False, True], ids=["binary", "ternary"])
def test_laq_follows_the_reference_rule(ternary, x64):
  params, loss = hinge_problem()
  spec = bq.quant_spec(params, bits=2 if ternary else 1,
                       scheme="ternary" if ternary else "linear")
  tx = bq.laq(1e-2, spec)

  @jax.jit
  def step(params, state):
    q = bq.quantize_params(params, spec, state=state)
    updates, state = tx.update(jax.grad(loss)(q), state, params)
    return optax.apply_updates(params, updates), state, q

  state = tx.init(params)
  ours = []
  for _ in range(40):
    params, state, q = step(params, state)
    ours.append([np.sign(np.asarray(q["l1"]["kernel"])), np.sign(np.asarray(q["l2"]["kernel"]))])
  ref = reference_laq(hinge_problem()[0], loss, 1e-2, 40, ternary)
  agree = sum(int(np.sum(a == b)) for o, r in zip(ours, ref) for a, b in zip(o, r))
  total = sum(a.size for o in ours for a in o)
  assert agree / total >= 0.999, (agree, total)
  if ternary:  # the ternary codes really use zero
    assert any(np.any(a == 0) for o in ours for a in o)


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
  for (p1, _), (p2, _) in zip(plain, chained):
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
      np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)


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
