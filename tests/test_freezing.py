"""Iterative weight freezing: EMA of oscillations, freezing above a threshold."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blaq_jax as bq

SPEC = {"k": bq.QuantSpec(1), "b": None}
W0 = {"k": jnp.array([0.05, 0.05, 0.5]), "b": jnp.array([0.3])}
# Weight 0 crosses zero every step (an oscillation from step 2 on), weight 1
# oscillates once (steps 1-2) and then stays, weight 2 never changes code.
UPDATES = [np.array(u) for u in (
    [-0.1, -0.1, 0.01], [0.1, 0.1, -0.01], [-0.1, 0.1, 0.01],
    [0.1, 0.1, -0.01], [-0.1, 0.1, 0.01], [0.1, -0.01, -0.01])]


def run(tx, steps=None):
  params, state = W0, tx.init(W0)
  update = jax.jit(tx.update)
  history = []
  for u in UPDATES[:steps]:
    updates = {"k": jnp.asarray(u, jnp.float32), "b": jnp.array([0.2])}
    out, state = update(updates, state, params)
    params = optax.apply_updates(params, out)
    history.append((out, params, state))
  return history


def test_frequency_ema_and_freezing_on_a_hand_made_sequence():
  history = run(bq.freeze_oscillations(0.3, SPEC, momentum=0.25, scale="none"))
  freq = np.array([h[2].frequency["k"] for h in history])
  # Weight 0: oscillates at steps 2, 3 -> 0.25, 0.4375 > 0.3: frozen after step 3.
  # Weight 1: one oscillation at step 2 (0.25), then decays; never frozen.
  np.testing.assert_allclose(freq[:3, 0], [0, 0.25, 0.4375])
  np.testing.assert_allclose(freq[:, 1], [0, 0.25, 0.1875, 0.140625, 0.10546875, 0.0791015625])
  np.testing.assert_array_equal(freq[:, 2], 0)
  frozen = np.array([h[2].frozen["k"] for h in history])
  np.testing.assert_array_equal(frozen[:, 0], [False, False, True, True, True, True])
  assert not frozen[:, 1:].any()
  np.testing.assert_array_equal(frozen, np.maximum.accumulate(freq > 0.3, axis=0))


def test_frozen_weights_stay_at_their_code():
  history = run(bq.freeze_oscillations(0.3, SPEC, momentum=0.25, scale="none"))
  w0 = np.array([h[1]["k"][0] for h in history])
  # Frozen at step 3 at its code (sign = -1, scale "none"), and never moves again.
  np.testing.assert_allclose(w0[2:], -1.0)
  assert all(float(h[0]["k"][0]) == 0 for h in history[3:])
  assert all(int(h[2].codes["k"][0]) == 0 for h in history[2:])
  # Unfrozen weights take their updates; the bias is passed through.
  np.testing.assert_allclose(history[-1][1]["k"][1:], W0["k"][1:] + np.sum(UPDATES, 0)[1:],
                             rtol=1e-5)
  np.testing.assert_allclose(history[-1][1]["b"], 0.3 + 0.2 * len(UPDATES), rtol=1e-6)


def test_threshold_schedule_and_no_freezing_above_one():
  history = run(bq.freeze_oscillations(1.0, SPEC, momentum=0.25, scale="none"))
  assert not np.any(history[-1][2].frozen["k"])
  # The threshold drops below weight 0's frequency only at step count 4 (5th step).
  thr = lambda count: jnp.where(count < 4, 1.0, 0.3)
  history = run(bq.freeze_oscillations(thr, SPEC, momentum=0.25, scale="none"))
  frozen = np.array([h[2].frozen["k"][0] for h in history])
  np.testing.assert_array_equal(frozen, [False, False, False, False, True, True])


def test_direction_of_multi_bit_codes():
  spec = {"k": bq.QuantSpec(3)}  # fixed grid k/3
  params = {"k": jnp.array([0.0])}
  tx = bq.freeze_oscillations(1.0, spec, momentum=0.5, scale="none")
  state = tx.init(params)
  freqs, dirs = [], []
  for u in (0.34, 0.33, -0.33, 0.33, 0.0):  # codes 3 -> 4 -> 5 -> 4 -> 5 -> 5
    out, state = tx.update({"k": jnp.array([u])}, state, params)
    params = optax.apply_updates(params, out)
    freqs.append(float(state.frequency["k"][0]))
    dirs.append(int(state.direction["k"][0]))
  np.testing.assert_allclose(freqs, [0, 0, 0.5, 0.75, 0.375])
  assert dirs == [1, 1, -1, 1, 1]


def test_chains_after_ste():
  params = {"k": jnp.array([[0.05, -0.4]])}
  spec = bq.quant_spec(params, bits=1)
  tx = optax.chain(bq.ste(optax.sgd(1.0), spec), bq.freeze_oscillations(0.3, spec, momentum=0.5))
  state = tx.init(params)
  for g in ([0.1, 0.0], [-0.1, 0.0], [0.1, 0.0], [-0.1, 0.0]):
    out, state = tx.update({"k": jnp.array([g])}, state, params)
    params = optax.apply_updates(params, out)
  assert bool(state[1].frozen["k"][0, 0]) and not bool(state[1].frozen["k"][0, 1])


def test_bad_input():
  with pytest.raises(ValueError, match="momentum"):
    bq.freeze_oscillations(0.1, SPEC, momentum=0.0)
  with pytest.raises(TypeError, match="threshold"):
    bq.freeze_oscillations("high", SPEC)
  with pytest.raises(ValueError, match="scale"):
    bq.freeze_oscillations(0.1, SPEC, scale="mean")
  with pytest.raises(TypeError, match="dtype"):
    bq.freeze_oscillations(0.1, {"k": bq.QuantSpec(1)}).init({"k": jnp.arange(3)})
  tx = bq.freeze_oscillations(0.1, SPEC)
  with pytest.raises(ValueError, match="params are required"):
    tx.update(W0, tx.init(W0))


def test_chains_after_laq_under_jit():
  x = jax.random.normal(jax.random.key(0), (16, 3))
  y = x @ jnp.array([[0.3], [-0.01], [0.1]])
  params = {"k": jnp.array([[0.2], [0.002], [0.1]])}
  spec = bq.quant_spec(params, bits=1)
  # A high learning rate makes the weight with target -0.01 cross zero back and forth.
  tx = optax.chain(bq.laq(0.05, spec), bq.freeze_oscillations(0.2, spec, momentum=0.5))
  loss = lambda p: jnp.mean((x @ p["k"] - y) ** 2)

  @jax.jit
  def step(params, state):
    g = jax.grad(loss)(bq.quantize_params(params, spec, bq.curvature(state)))
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state, u

  state = tx.init(params)
  was_frozen = np.zeros((3, 1), bool)
  for _ in range(20):
    params, state, u = step(params, state)
    # Weights frozen before this step did not move in it.
    assert np.all(np.asarray(u["k"])[was_frozen] == 0)
    was_frozen = np.asarray(state[1].frozen["k"])
  assert was_frozen.any() and not was_frozen.all()
