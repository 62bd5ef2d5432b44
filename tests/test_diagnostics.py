"""Oscillation diagnostics: flips, amplitudes and cosines on hand-made sequences."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blaq_jax as bq

SPEC = {"k": bq.QuantSpec(1), "b": None}
PARAMS = {"k": jnp.array([0.1, 0.1]), "b": jnp.array([0.0])}
# Latent positions of the two weights: w0 0.1 -0.1 0.1 -0.1 | -0.1 0.1
#                                      w1 0.1  0.2 0.3 -0.2 | -0.2 -0.2
UPDATES = [[-0.2, 0.1], [0.2, 0.1], [-0.2, -0.5], [0.0, 0.0], [0.2, 0.0]]


def run(steps, window=3):
  tx = bq.track_oscillations(SPEC, window=window, scale="none")
  params, state = PARAMS, tx.init(PARAMS)
  update = jax.jit(tx.update)
  for u in UPDATES[:steps]:
    updates = {"k": jnp.array(u), "b": jnp.array([1.0])}
    out, state = update(updates, state, params)
    jax.tree.map(np.testing.assert_array_equal, out, updates)  # identity on updates
    params = optax.apply_updates(params, out)
  return {k: float(v) for k, v in bq.oscillation_stats(state).items()}, state


def test_counts_on_a_hand_made_sequence():
  stats, state = run(5)
  assert stats["k/flips"] == 5  # w0 flips at steps 1, 2, 3, 5; w1 at step 3
  # The last completed window is steps 1-3.
  assert stats["window_steps"] == 3
  assert stats["k/window_flips"] == 4
  assert stats["k/max_weight_flips"] == 3
  np.testing.assert_allclose(stats["k/flip_frequency"], 4 / (2 * 3))
  np.testing.assert_allclose(stats["k/amplitude_max"], 0.5, rtol=1e-6)
  np.testing.assert_allclose(stats["k/amplitude_mean"], (0.2 + 0.5) / 2, rtol=1e-6)
  cos2 = (-0.04 + 0.01) / 0.05
  cos3 = (-0.04 - 0.05) / np.sqrt(0.29 * 0.05)
  np.testing.assert_allclose(stats["k/cosine_mean"], (0 + cos2 + cos3) / 3, rtol=1e-5)
  assert stats["k/cosine"] == 0  # the step-4 update is zero
  np.testing.assert_array_equal(state.last_flips["k"], [3, 1])
  np.testing.assert_array_equal(state.window_flips["k"], [1, 0])  # step 5, new window
  assert state.codes["b"] is None and not any(k.startswith("b/") for k in stats)
  for key in ("flips", "window_flips", "max_weight_flips", "amplitude_max", "cosine"):
    assert f"all/{key}" in stats


def test_partial_window_before_the_first_one_completes():
  stats, _ = run(2)
  assert stats["window_steps"] == 2
  assert stats["k/window_flips"] == 2
  np.testing.assert_allclose(stats["k/amplitude_max"], 0.2, rtol=1e-6)
  np.testing.assert_allclose(stats["k/cosine"], (-0.04 + 0.01) / 0.05, rtol=1e-5)
  np.testing.assert_allclose(stats["all/cosine"], stats["k/cosine"], rtol=1e-6)


def test_chains_with_blaq_under_jit_and_matches_an_independent_count():
  x = jax.random.normal(jax.random.key(0), (32, 3))
  y = x @ jnp.array([[0.3], [-0.2], [0.1]])
  params = {"k": 0.05 * jax.random.normal(jax.random.key(1), (3, 1)), "b": jnp.zeros(1)}
  spec = bq.quant_spec(params, bits=1)
  tx = optax.chain(bq.blaq(0.05, spec), bq.track_oscillations(spec, window=4))
  loss = lambda p: jnp.mean((x @ p["k"] + p["b"] - y) ** 2)

  @jax.jit
  def step(params, state):
    g = jax.grad(loss)(bq.quantize_params(params, spec, bq.curvature(state)))
    u, state = tx.update(g, state, params, grad_fn=jax.grad(loss))
    return optax.apply_updates(params, u), state

  state = tx.init(params)
  signs = [np.asarray(params["k"]) >= 0]
  for _ in range(12):
    params, state = step(params, state)
    signs.append(np.asarray(params["k"]) >= 0)
  expected = int(np.sum(np.diff(np.array(signs).astype(int), axis=0) != 0))
  stats = jax.jit(bq.oscillation_stats)(state)
  assert expected > 0 and float(stats["k/flips"]) == expected
  assert float(stats["all/flips"]) == expected
  # Found inside inject_hyperparams too.
  inj = optax.inject_hyperparams(lambda lr: optax.chain(
      optax.sgd(lr), bq.track_oscillations(spec)))(lr=0.1)
  assert float(bq.oscillation_stats(inj.init(params))["all/flips"]) == 0


def test_bad_input():
  with pytest.raises(ValueError, match="window"):
    bq.track_oscillations(SPEC, window=0)
  with pytest.raises(ValueError, match="scale"):
    bq.track_oscillations(SPEC, scale="mean")
  with pytest.raises(ValueError, match="no OscillationState"):
    bq.oscillation_stats(optax.adam(1e-3).init(PARAMS))
  tx = bq.track_oscillations(SPEC)
  with pytest.raises(ValueError, match="params are required"):
    tx.update(PARAMS, tx.init(PARAMS))
