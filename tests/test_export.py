"""Export: bit-packing round trip and size report."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import blaq_jax as bq
from blaq_jax._src import export
from helpers import assert_bits_equal, some_slow


def _params(seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  return {
      "conv": {"kernel": jax.random.normal(k[0], (3, 3, 4, 8)) * 0.1,
               "bias": jax.random.normal(k[1], (8,))},
      "dense": {"kernel": jax.random.normal(k[2], (37, 5)), "bias": jnp.zeros((5,))},
      "head": {"kernel": jax.random.uniform(k[3], (5, 3), minval=-1, maxval=1)},
  }


def _curvature(params, seed=1):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(
      treedef, [jax.random.uniform(k, x.shape, minval=0.1, maxval=3.0)
                for k, x in zip(keys, leaves)])


SPECS = [
    dict(bits=1),
    dict(bits=1, per_channel=True),
    dict(bits=2),
    dict(bits=2, scheme="ternary"),
    dict(bits=3, scheme="log"),
    dict(bits=3, scheme="log", per_channel=True),
    dict(bits=4, per_channel=True),
    dict(bits=8),
]


@pytest.mark.parametrize("with_curvature", [True])
@pytest.mark.parametrize("kwargs", some_slow(SPECS, fast={0, 3, 5, 7}),
                         ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_round_trip_is_bit_exact(kwargs, with_curvature):
  params = _params()
  spec = bq.quant_spec(params, **kwargs)
  curv = _curvature(params) if with_curvature else None
  expected = bq.quantize_params(params, spec, curv)
  packed = bq.pack(params, spec, curv)
  restored = bq.unpack(packed, like=params)
  assert_bits_equal(restored, expected)
  # Quantized leaves really are quantized: few distinct values.
  k = kwargs["bits"]
  assert len(np.unique(np.asarray(restored["dense"]["kernel"]))) <= 2 ** k * 5


def test_round_trip_without_curvature():
  test_round_trip_is_bit_exact(dict(bits=2), with_curvature=False)
  test_round_trip_is_bit_exact(dict(bits=1), with_curvature=False)


def test_round_trip_with_laq_curvature_and_nnx_state(tmp_path):
  model = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  spec = bq.quant_spec(params, bits=2, scheme="ternary")
  tx = bq.laq(1e-2, spec)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = tx.update(grads, state, params)
  params = jax.tree.map(lambda p, u: p + u, params, updates)
  curv = bq.curvature(state)
  path = tmp_path / "model.npz"
  bq.save_packed(path, bq.pack(params, spec, curv))
  restored = bq.unpack(path, like=params)
  expected = bq.quantize_params(params, spec, curv)
  assert isinstance(restored, nnx.State)
  # The restored State holds arrays where expected holds nnx.Params: compare the leaves.
  assert_bits_equal(jax.tree.leaves(restored), jax.tree.leaves(expected))
  flat = bq.unpack(path)
  assert set(flat) == {"bias/value", "kernel/value"} or set(flat) == {"bias", "kernel"}


def test_codes_are_packed_in_bits_per_weight():
  w = jnp.asarray(np.random.default_rng(0).normal(size=(100, 10)), jnp.float32)
  for bits in (1, 2, 3, 4, 8):
    packed = bq.pack({"w": w}, {"w": bq.QuantSpec(bits)})
    assert packed["w::codes"].nbytes == -(-1000 * bits // 8)
    assert packed["w::codes"].dtype == np.uint8


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_index_packing_round_trip(bits):
  rng = np.random.default_rng(bits)
  idx = rng.integers(0, 2 ** bits, size=1001).astype(np.uint8)
  packed = export._pack_indices(idx, bits)
  np.testing.assert_array_equal(export._unpack_indices(packed, bits, idx.size), idx)


def test_size_report():
  params = {"a": {"kernel": jnp.ones((100, 80)), "bias": jnp.ones((80,))}}
  spec = bq.quant_spec(params, bits=1)
  lines = []
  report = bq.size_report(bq.pack(params, spec), print_fn=lines.append)
  layers = {l["path"]: l for l in report["layers"]}
  assert layers["a/kernel"]["fp32_bytes"] == 32000
  assert layers["a/kernel"]["packed_bytes"] == 1000 + 4
  assert layers["a/bias"]["packed_bytes"] == 320
  assert report["fp32_bytes"] == 32320
  assert report["packed_bytes"] == 1324
  assert report["ratio"] == pytest.approx(32320 / 1324)
  assert lines[0].split()[0] == "layer"
  assert [l.split()[0] for l in lines[-2:]] == ["total", "on"]
  assert report["device_bytes"] == 1000 + 4 + 320 and report["file_bytes"] is None
  assert any("a/kernel" in l for l in lines)


def test_errors():
  params = _params()
  with pytest.raises(ValueError, match="spec tree does not match"):
    bq.pack(params, {"conv": None})
  with pytest.raises(ValueError, match="not a packed model"):
    bq.unpack({"x": np.zeros(3)})
  packed = bq.pack(params, bq.quant_spec(params, bits=1))
  with pytest.raises(ValueError, match="does not match `like`"):
    bq.unpack(packed, like={"other": jnp.zeros(3)})
