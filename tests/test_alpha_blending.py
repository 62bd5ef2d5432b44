"""Alpha-blending: (1-α) w + α sg(Q(w)) and its schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blaq_jax as bq

PARAMS = {"k": jnp.array([[0.3, -0.2, 0.7], [0.05, -0.6, 0.9]]), "b": jnp.array([0.4, -0.1])}


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_alpha_zero_is_full_precision_and_alpha_one_is_quantized(bits):
  spec = bq.quant_spec(PARAMS, bits=bits)
  fp = bq.alpha_blend_params(PARAMS, spec, 0.0)
  jax.tree.map(np.testing.assert_array_equal, fp, PARAMS)
  q = bq.alpha_blend_params(PARAMS, spec, 1.0)
  np.testing.assert_array_equal(q["k"], bq.quantize(PARAMS["k"], spec["k"]))
  np.testing.assert_array_equal(q["b"], PARAMS["b"])
  qn = bq.alpha_blend_params(PARAMS, spec, 1.0, scale="none")
  np.testing.assert_array_equal(qn["k"], bq.ste_quantize(PARAMS["k"], spec["k"], scale="none"))


def test_blend_and_its_gradient():
  spec = bq.quant_spec(PARAMS, bits=1)
  q = bq.quantize(PARAMS["k"], spec["k"])
  for alpha in (0.0, 0.25, 1.0):
    blended = bq.alpha_blend_params(PARAMS, spec, alpha)
    np.testing.assert_allclose(blended["k"], (1 - alpha) * PARAMS["k"] + alpha * q, rtol=1e-6)
    g = jax.grad(lambda p: jnp.sum(bq.alpha_blend_params(p, spec, alpha)["k"]) +
                 jnp.sum(bq.alpha_blend_params(p, spec, alpha)["b"]))(PARAMS)
    np.testing.assert_allclose(g["k"], np.full((2, 3), 1 - alpha), rtol=1e-6)
    np.testing.assert_array_equal(g["b"], np.ones(2))


def test_traced_alpha_under_jit():
  spec = bq.quant_spec(PARAMS, bits=1)
  f = jax.jit(lambda p, a: bq.alpha_blend_params(p, spec, a)["k"])
  np.testing.assert_allclose(f(PARAMS, 0.5), bq.alpha_blend_params(PARAMS, spec, 0.5)["k"])


def test_schedule_rises_from_zero_to_one():
  s = bq.alpha_blending_schedule(10, 20)
  values = np.array([float(s(t)) for t in range(0, 31)])
  assert np.all(values[:11] == 0) and np.all(values[20:] == 1)
  assert np.all(np.diff(values) >= 0)
  np.testing.assert_allclose(values[15], 1 - 0.5 ** 3, rtol=1e-6)
  linear = bq.alpha_blending_schedule(0, 4, power=1.0)
  np.testing.assert_allclose([float(linear(t)) for t in range(5)], [0, .25, .5, .75, 1], atol=1e-7)


def test_bad_input():
  spec = bq.quant_spec(PARAMS, bits=1)
  with pytest.raises(ValueError, match="alpha"):
    bq.alpha_blend_params(PARAMS, spec, 1.5)
  with pytest.raises(ValueError, match="scale"):
    bq.alpha_blend_params(PARAMS, spec, 0.5, scale="x")
  with pytest.raises(ValueError, match="end_step"):
    bq.alpha_blending_schedule(5, 5)
  with pytest.raises(ValueError, match="start_step"):
    bq.alpha_blending_schedule(-1, 5)
