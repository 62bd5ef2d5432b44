"""Oscillation dampening: g + 2 λ(t) (w - Q(w)) on quantized leaves."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blaq_jax as bq

PARAMS = {"k": jnp.array([[0.3, -0.2, 0.7], [0.05, -0.6, 0.9]]), "b": jnp.array([0.4, -0.1])}
SPEC = bq.quant_spec(PARAMS, bits=1)
GRADS = jax.tree.map(lambda w: 0.1 * jnp.ones_like(w), PARAMS)


@pytest.mark.parametrize("scale", ["fit", "none"])
def test_adds_the_gradient_of_the_stated_regulariser(scale):
  lam = 0.3
  tx = bq.add_oscillation_dampening(lam, SPEC, scale=scale)
  out, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
  q = bq.ste_quantize(PARAMS["k"], SPEC["k"], scale=scale)
  np.testing.assert_allclose(out["k"], 0.1 + 2 * lam * (PARAMS["k"] - q), rtol=1e-6)
  np.testing.assert_array_equal(out["b"], GRADS["b"])  # not quantized: untouched
  # The same as autodiff of λ ||sg(Q(w)) - w||².
  reg = lambda w: lam * jnp.sum((jax.lax.stop_gradient(
      bq.ste_quantize(w, SPEC["k"], scale=scale)) - w) ** 2)
  np.testing.assert_allclose(out["k"] - 0.1, jax.grad(reg)(PARAMS["k"]), rtol=1e-6)


def test_pulls_weights_toward_their_grid_point_with_the_stated_strength():
  # BinaryConnect grid (Q = sign) and no loss gradient: one SGD step of size lr
  # contracts the distance to Q(w) by exactly (1 - 2 λ lr).
  lam, lr = 0.5, 0.4
  tx = optax.chain(bq.add_oscillation_dampening(lam, SPEC, scale="none"), optax.sgd(lr))
  zero = jax.tree.map(jnp.zeros_like, PARAMS)
  state = tx.init(PARAMS)
  params = PARAMS
  for _ in range(3):
    updates, state = tx.update(zero, state, params)
    params = optax.apply_updates(params, updates)
  q = np.where(PARAMS["k"] >= 0, 1.0, -1.0)
  np.testing.assert_allclose(params["k"] - q, (1 - 2 * lam * lr) ** 3 * (PARAMS["k"] - q),
                             rtol=1e-5)
  np.testing.assert_array_equal(params["b"], PARAMS["b"])


def test_weight_may_be_a_schedule():
  tx = bq.add_oscillation_dampening(lambda count: 0.1 * count, SPEC)
  state = tx.init(PARAMS)
  q = bq.ste_quantize(PARAMS["k"], SPEC["k"])
  for t in range(3):
    out, state = jax.jit(tx.update)(GRADS, state, PARAMS)
    np.testing.assert_allclose(out["k"], 0.1 + 2 * 0.1 * t * (PARAMS["k"] - q), rtol=1e-5)
  assert int(state.count) == 3


def test_bad_input():
  with pytest.raises(ValueError, match="weight"):
    bq.add_oscillation_dampening(-1.0, SPEC)
  with pytest.raises(TypeError, match="weight"):
    bq.add_oscillation_dampening("big", SPEC)
  with pytest.raises(ValueError, match="scale"):
    bq.add_oscillation_dampening(0.1, SPEC, scale="mean")
  tx = bq.add_oscillation_dampening(0.1, SPEC)
  with pytest.raises(ValueError, match="params are required"):
    tx.update(GRADS, tx.init(PARAMS))
  with pytest.raises(ValueError, match="spec tree does not match"):
    bq.add_oscillation_dampening(0.1, {"k": None}).init(PARAMS)
