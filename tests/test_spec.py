"""quant_spec / quantize_params: which leaves are quantized, overrides, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import blaq_jax as bq


def params():
  return {
      "conv_init": {"kernel": jnp.ones((3, 3, 1, 4)), "bias": jnp.zeros(4)},
      "body": [{"kernel": jnp.ones((4, 4)) * 0.3, "bias": jnp.zeros(4)}],
      "norm": {"scale": jnp.ones(4)},
      "head": {"kernel": jnp.ones((4, 2)) * -0.2, "bias": jnp.zeros(2)},
  }


def test_default_quantizes_kernels_only():
  spec = bq.quant_spec(params(), bits=2, tol=1e-5, max_iters=7)
  assert spec["body"][0]["kernel"] == bq.QuantSpec(2, tol=1e-5, max_iters=7)
  assert spec["conv_init"]["kernel"] == bq.QuantSpec(2, tol=1e-5, max_iters=7)
  assert spec["body"][0]["bias"] is None
  assert spec["norm"]["scale"] is None


def test_overrides_first_match_wins_and_types():
  spec = bq.quant_spec(params(), bits=1, overrides={
      "conv_init/kernel": 8,
      "head": bq.QuantSpec(4, scheme="log"),
      "body/0/kernel": None,
      "kernel": 3,  # shadowed by the earlier patterns where they match
  })
  assert spec["conv_init"]["kernel"] == bq.QuantSpec(8)
  assert spec["head"]["kernel"] == bq.QuantSpec(4, scheme="log")
  # bits/QuantSpec overrides change included leaves only: the bias stays full precision.
  assert spec["head"]["bias"] is None
  assert spec["body"][0]["kernel"] is None
  assert spec["conv_init"]["bias"] is None


def test_ternary_default_with_int_override():
  spec = bq.quant_spec(params(), bits=2, scheme="ternary", overrides={"head/kernel": 8})
  assert spec["head"]["kernel"] == bq.QuantSpec(8, scheme="linear")
  assert spec["body"][0]["kernel"] == bq.QuantSpec(2, scheme="ternary")


def test_include_regex_and_callable():
  spec = bq.quant_spec(params(), bits=1, include="body")
  assert spec["body"][0]["kernel"] == bq.QuantSpec(1)
  assert spec["body"][0]["bias"] == bq.QuantSpec(1)
  assert spec["head"]["kernel"] is None
  spec = bq.quant_spec(params(), bits=1, include=lambda path, leaf: leaf.ndim == 4)
  assert spec["conv_init"]["kernel"] == bq.QuantSpec(1)
  assert spec["body"][0]["kernel"] is None


def test_unknown_override_pattern_is_an_error():
  with pytest.raises(ValueError, match="match(es)? no parameter path"):
    bq.quant_spec(params(), bits=1, overrides={"hed": 8})


def test_bad_override_value():
  with pytest.raises(TypeError, match="override 'head'"):
    bq.quant_spec(params(), bits=1, overrides={"head": "8"})
  with pytest.raises(ValueError, match="bits"):
    bq.quant_spec(params(), bits=1, overrides={"head": 9})


def test_quantize_params_is_a_pure_map():
  p = params()
  spec = bq.quant_spec(p, bits=1)
  q = bq.quantize_params(p, spec)
  assert q["body"][0]["bias"] is p["body"][0]["bias"]
  assert q["norm"]["scale"] is p["norm"]["scale"]
  np.testing.assert_allclose(q["head"]["kernel"], -0.2 * np.ones((4, 2)), rtol=1e-6)
  np.testing.assert_array_equal(p["head"]["kernel"], params()["head"]["kernel"])
  q2 = jax.jit(lambda p: bq.quantize_params(p, spec))(p)
  chex.assert_trees_all_equal(q, q2)


def test_quantize_params_with_curvature_tree():
  p = {"k": jnp.array([[1.0, -0.1], [0.5, -2.0]]), "b": jnp.ones(2)}
  spec = bq.quant_spec(p, bits=1)
  curv = {"k": jnp.array([[10.0, 1.0], [1.0, 1.0]]), "b": None}
  q = bq.quantize_params(p, spec, curv)
  np.testing.assert_allclose(q["k"], bq.quantize(p["k"], bq.QuantSpec(1), curv["k"]))
  np.testing.assert_array_equal(q["b"], p["b"])


def test_spec_mismatch_names_the_paths():
  p = params()
  spec = bq.quant_spec(p, bits=1)
  del p["head"]
  with pytest.raises(ValueError, match=r"only in spec: \['head/bias', 'head/kernel'\]"):
    bq.quantize_params(p, spec)


def test_nnx_state_params():
  class Net(nnx.Module):

    def __init__(self, rngs):
      self.dense = nnx.Linear(3, 4, rngs=rngs)
      self.norm = nnx.BatchNorm(4, rngs=rngs)

  _, state, _ = nnx.split(Net(nnx.Rngs(0)), nnx.Param, ...)
  with pytest.raises(ValueError, match="'dense/bias' matches only leaves that include="):
    bq.quant_spec(state, bits=1, overrides={"dense/bias": 8})
  spec = bq.quant_spec(state, bits=1, include="dense", overrides={"dense/bias": 8})
  q = bq.quantize_params(state, spec)
  k = state["dense"]["kernel"][...]
  np.testing.assert_allclose(q["dense"]["kernel"][...], bq.quantize(k, bq.QuantSpec(1)))
  np.testing.assert_array_equal(q["norm"]["scale"][...], state["norm"]["scale"][...])
  assert len(np.unique(np.asarray(q["dense"]["bias"][...]))) <= 2  # zeros -> one code
