"""Coarse-gradient activation quantizers: forward values and proxy gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blaq_jax as bq

# Away from the proxies' kinks (0, max_value, +-1), where any subgradient is fair.
X = jnp.array([-2.3, -0.7, -0.2, 0.1, 0.26, 0.5, 0.74, 0.95, 1.4, 3.0])


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_quantized_relu_forward(bits):
  y = bq.quantize_activation(X, bits)
  steps = 2 ** bits - 1
  np.testing.assert_allclose(y, np.round(np.clip(X, 0, 1) * steps) / steps, rtol=1e-6)
  assert set(np.round(np.asarray(y) * steps).astype(int)) <= set(range(steps + 1))


def test_quantized_relu_max_value_scales_the_levels():
  y = bq.quantize_activation(X, 2, max_value=2.0)
  np.testing.assert_allclose(y, 2.0 * np.round(np.clip(X / 2.0, 0, 1) * 3) / 3, rtol=1e-6)


@pytest.mark.parametrize("proxy,expected", [
    ("identity", np.ones_like(X)),
    ("relu", (X > 0).astype(np.float32)),
    ("clipped_relu", ((X > 0) & (X < 1)).astype(np.float32)),
])
def test_quantized_relu_gradient_is_the_proxy_derivative(proxy, expected):
  f = lambda x: jnp.sum(bq.quantize_activation(x, 2, proxy=proxy))
  np.testing.assert_array_equal(jax.grad(f)(X), expected)
  # Reverse and forward mode agree, and it composes with a chain rule.
  _, tangent = jax.jvp(lambda x: bq.quantize_activation(x, 2, proxy=proxy), (X,), (2 * X,))
  np.testing.assert_allclose(tangent, 2 * X * expected, rtol=1e-6)
  g = jax.grad(lambda x: jnp.sum(bq.quantize_activation(3 * x, 2, proxy=proxy) ** 2))(X)
  y = bq.quantize_activation(3 * X, 2, proxy=proxy)
  prox3 = {"identity": np.ones_like(X), "relu": (3 * X > 0),
           "clipped_relu": (3 * X > 0) & (3 * X < 1)}[proxy].astype(np.float32)
  np.testing.assert_allclose(g, 2 * y * 3 * prox3, rtol=1e-6)


def test_clipped_relu_proxy_respects_max_value():
  g = jax.grad(lambda x: jnp.sum(bq.quantize_activation(x, 3, max_value=2.0)))(X)
  np.testing.assert_array_equal(g, ((X > 0) & (X < 2)).astype(np.float32))


def test_sign_activation_forward_and_proxies():
  x = jnp.array([-1.5, -0.5, 0.0, 0.5, 1.5])
  np.testing.assert_array_equal(bq.sign_activation(x), [-1, -1, 1, 1, 1])
  g = jax.grad(lambda x: jnp.sum(bq.sign_activation(x)))(x)
  np.testing.assert_array_equal(g, [0, 1, 1, 1, 0])
  g = jax.grad(lambda x: jnp.sum(bq.sign_activation(x, proxy="identity")))(x)
  np.testing.assert_array_equal(g, [1, 1, 1, 1, 1])


def test_jit_and_vmap():
  f = jax.jit(jax.vmap(jax.grad(lambda x: bq.quantize_activation(x, 2, proxy="relu"))))
  np.testing.assert_array_equal(f(X), (X > 0).astype(np.float32))
  g = jax.jit(jax.vmap(jax.grad(lambda x: bq.sign_activation(x))))
  np.testing.assert_array_equal(g(X), (jnp.abs(X) <= 1).astype(np.float32))


def test_bad_input():
  with pytest.raises(ValueError, match="bits"):
    bq.quantize_activation(X, 0)
  with pytest.raises(ValueError, match="proxy"):
    bq.quantize_activation(X, 2, proxy="tanh")
  with pytest.raises(ValueError, match="max_value"):
    bq.quantize_activation(X, 2, max_value=0.0)
  with pytest.raises(TypeError, match="floating"):
    bq.quantize_activation(jnp.arange(3), 2)
  with pytest.raises(ValueError, match="proxy"):
    bq.sign_activation(X, proxy="relu")
