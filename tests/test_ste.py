"""STE family: BinaryConnect, BWN, k-bit uniform; the ste() wrapper."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blaq_jax as bq

W = jnp.array([[0.3, -0.2, 0.0], [0.05, -0.6, 0.9]])


def test_bwn_is_mean_abs_times_sign():
  q = bq.ste_quantize(W, bq.QuantSpec(1))
  np.testing.assert_allclose(q, np.mean(np.abs(W)) * np.where(W >= 0, 1, -1), rtol=1e-6)


def test_bwn_per_channel_uses_one_scale_per_output_column():
  q = bq.ste_quantize(W, bq.QuantSpec(1, per_channel=True))
  alpha = np.mean(np.abs(W), axis=0, keepdims=True)
  np.testing.assert_allclose(q, alpha * np.where(W >= 0, 1, -1), rtol=1e-6)


def test_binaryconnect_is_sign_without_scale():
  q = bq.ste_quantize(W, bq.QuantSpec(1), scale="none")
  np.testing.assert_array_equal(q, np.where(W >= 0, 1.0, -1.0))


def test_kbit_uniform():
  spec = bq.QuantSpec(3)  # n = 3 levels per side
  fixed = bq.ste_quantize(W, spec, scale="none")
  np.testing.assert_allclose(fixed, np.round(np.clip(W, -1, 1) * 3) / 3, rtol=1e-6)
  fitted = bq.ste_quantize(W, spec)
  np.testing.assert_allclose(fitted, bq.quantize(W, spec), rtol=1e-6)
  assert len(np.unique(np.round(np.asarray(fitted), 6))) <= 7


def test_straight_through_gradient_is_the_gradient_at_the_quantized_weights():
  params = {"k": W, "b": jnp.array([0.5, -2.0, 3.0])}
  spec = bq.quant_spec(params, bits=1)
  target = jnp.arange(6.0).reshape(2, 3)

  def loss(p):
    return jnp.sum((p["k"] - target) ** 2) + jnp.sum(p["b"] ** 2)

  for scale in ("fit", "none"):
    q = bq.ste_quantize_params(params, spec, scale=scale)
    coarse = jax.grad(lambda p: loss(bq.ste_quantize_params(p, spec, scale=scale)))(params)
    at_q = jax.grad(loss)(q)
    jax.tree.map(np.testing.assert_allclose, coarse, at_q)
    np.testing.assert_array_equal(q["b"], params["b"])  # spec None: untouched


def test_ste_wrapper_steps_with_the_optimizer_and_clips_only_quantized_leaves():
  params = {"k": jnp.array([[0.95, -0.5]]), "b": jnp.array([0.95])}
  spec = bq.quant_spec(params, bits=1)
  grads = {"k": jnp.array([[-1.0, 0.2]]), "b": jnp.array([-1.0])}
  tx = bq.ste(optax.sgd(0.1), spec)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params, grad_fn=None)  # extra args ignored
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["k"], [[1.0, -0.52]], rtol=1e-6)  # 1.05 clipped to 1
  np.testing.assert_allclose(new["b"], [1.05], rtol=1e-6)          # not quantized: not clipped


def test_ste_wrapper_keeps_the_inner_optimizer_state():
  params = {"k": jnp.array([[0.1, -0.2]])}
  spec = bq.quant_spec(params, bits=1)
  grads = {"k": jnp.array([[0.3, -0.1]])}
  tx, ref = bq.ste(optax.adam(1e-3), spec, clip=None), optax.adam(1e-3)
  s, r = tx.init(params), ref.init(params)
  u, s = tx.update(grads, s, params)
  v, r = ref.update(grads, r, params)
  np.testing.assert_array_equal(u["k"], v["k"])
  jax.tree.map(np.testing.assert_array_equal, s.inner_state, r)


def test_bwn_ste_fits_a_representable_target():
  x = jax.random.normal(jax.random.key(0), (64, 4))
  w_true = 0.5 * jnp.array([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]])
  y = x @ w_true
  params = {"k": 0.1 * jax.random.normal(jax.random.key(1), (4, 2))}
  spec = bq.quant_spec(params, bits=1)
  tx = bq.ste(optax.adam(0.02), spec)
  loss = lambda p: jnp.mean((x @ p["k"] - y) ** 2)

  @jax.jit
  def step(params, state):
    g = jax.grad(lambda p: loss(bq.ste_quantize_params(p, spec)))(params)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  state = tx.init(params)
  start = loss(bq.ste_quantize_params(params, spec))
  for _ in range(150):
    params, state = step(params, state)
  q = bq.ste_quantize_params(params, spec)
  assert float(loss(q)) < 1e-3 * float(start)
  assert float(jnp.max(jnp.abs(params["k"]))) <= 1.0


def test_bad_input():
  params = {"k": W}
  spec = bq.quant_spec(params, bits=1)
  with pytest.raises(ValueError, match="scale"):
    bq.ste_quantize_params(params, spec, scale="mean")
  with pytest.raises(TypeError, match="QuantSpec"):
    bq.ste_quantize(W, 1)
  with pytest.raises(TypeError, match="optimizer"):
    bq.ste(lambda g: g, spec)
  with pytest.raises(ValueError, match="clip"):
    bq.ste(optax.sgd(0.1), spec, clip=0.0)
  with pytest.raises(ValueError, match="spec tree does not match"):
    bq.ste(optax.sgd(0.1), {"other": None}).init(params)
  with pytest.raises(ValueError, match="params are required"):
    tx = bq.ste(optax.sgd(0.1), spec)
    tx.update(params, tx.init(params))


def test_ste_forward_value_is_exactly_the_projection():
  w = jax.random.normal(jax.random.key(3), (64, 32)) * 0.3
  for spec in (bq.QuantSpec(1), bq.QuantSpec(3), bq.QuantSpec(2, per_channel=True)):
    np.testing.assert_array_equal(bq.ste_quantize(w, spec), bq.quantize(w, spec))
    g = jax.grad(lambda w: jnp.sum(bq.ste_quantize(w, spec) * 2.0))(w)
    np.testing.assert_array_equal(g, 2.0 * np.ones_like(w))
