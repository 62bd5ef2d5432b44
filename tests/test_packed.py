"""Packed weights as a JAX value: bq.PackedArray through jit, sharding, orbax and NNX."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import blaq_jax as bq
from blaq_jax._src import packed as packed_lib
from examples.classification import models as cls_models
from examples.imagenet_resnet18 import models as r18_models
from helpers import as_bits, bit_exact, some_slow


def _params(dtype=jnp.float32):
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  return {
      "conv": {"kernel": (jax.random.normal(k[0], (3, 3, 4, 8)) * 0.1).astype(dtype),
               "bias": jax.random.normal(k[1], (8,)).astype(dtype)},
      "dense": {"kernel": jax.random.normal(k[2], (37, 5)).astype(dtype),
                "bias": jnp.zeros((5,), dtype)},
      "head": {"kernel": jax.random.uniform(k[3], (5, 3), minval=-1, maxval=1).astype(dtype)},
  }


def _trained(params, spec, steps=2):
  """Params and LAQ state after a few steps (scales warm-started by the updates)."""
  tx = bq.laq(1e-2, spec)
  state = tx.init(params)
  loss = lambda p: sum(jnp.sum(jnp.sin(3.0 * x.astype(jnp.float32))) for x in jax.tree.leaves(p))

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(bq.quantize_params(params, spec, state=state))
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


SPECS = [
    dict(bits=1),
    dict(bits=1, per_channel=True),
    dict(bits=2),
    dict(bits=2, scheme="ternary"),
    dict(bits=3),
    dict(bits=3, scheme="log"),
    dict(bits=4, scheme="log", per_channel=True),
    dict(bits=4, per_channel=True),
    dict(bits=5),
    dict(bits=6, per_channel=True),
    dict(bits=7, scheme="log"),
    dict(bits=8),
]


@bit_exact
@pytest.mark.parametrize("kwargs", some_slow(SPECS, fast={0, 3, 5, 8, 11}),
                         ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_dequantize_is_w_hat_bit_for_bit_inside_jit(kwargs):
  params = _params()
  spec = bq.quant_spec(params, **kwargs)
  params, state = _trained(params, spec)
  want = bq.quantize_params(params, spec, state=state)
  packed = bq.pack_params(params, spec, state=state)
  assert isinstance(packed["dense"]["kernel"], bq.PackedArray)
  assert not isinstance(packed["dense"]["bias"], bq.PackedArray)
  chex.assert_trees_all_equal(as_bits(jax.jit(bq.dequantize_tree)(packed)), as_bits(want))
  chex.assert_trees_all_equal(as_bits(bq.dequantize_tree(packed)), as_bits(want))
  # Inside a jitted step XLA may fold α into 1/n (α · (k/n) -> k · (α/n)): the
  # same ŵ up to one rounding.
  jitted = jax.jit(lambda p, s: bq.quantize_params(p, spec, state=s))(params, state)
  chex.assert_trees_all_close(jax.jit(bq.dequantize_tree)(packed), jitted, rtol=2e-7, atol=0)
  # Only the codes and the scales are held: ceil(n bits / 8) bytes + 4 per scale.
  leaf = packed["conv"]["kernel"]
  n_scales = 8 if kwargs.get("per_channel") else 1
  assert leaf.codes.dtype == jnp.uint8 and leaf.codes.shape == (-(-288 * kwargs["bits"] // 8),)
  assert leaf.nbytes == leaf.codes.size + 4 * n_scales
  assert leaf.scale.shape == ((1, 1, 1, 8) if n_scales == 8 else (1, 1, 1, 1))
  # The npz export is the same value.
  chex.assert_trees_all_equal(as_bits(bq.unpack(bq.pack(params, spec, state=state), like=params)),
                              as_bits(want))


def test_half_precision_and_curvature():
  params = _params(jnp.bfloat16)
  spec = bq.quant_spec(params, bits=3)
  curv = jax.tree.map(lambda x: jnp.full(x.shape, 0.5) + jnp.abs(x.astype(jnp.float32)), params)
  packed = bq.pack_params(params, spec, curv)
  assert packed["dense"]["kernel"].dtype == jnp.bfloat16
  assert packed["dense"]["kernel"].scale.dtype == jnp.float32
  got = jax.jit(bq.dequantize_tree)(packed)
  chex.assert_trees_all_equal(as_bits(got), as_bits(bq.quantize_params(params, spec, curv)))


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_packing_matches_numpy_layout(bits):
  for n in (1, 7, 8, 13, 1001):
    idx = np.random.default_rng(bits * n).integers(0, 2 ** bits, n).astype(np.uint8)
    codes = np.packbits(np.unpackbits(idx.reshape(-1, 1), axis=1, bitorder="little")[:, :bits]
                        .reshape(-1), bitorder="little")
    np.testing.assert_array_equal(np.asarray(packed_lib.pack_indices(idx, bits)), codes)
    unpack = jax.jit(packed_lib.unpack_indices, static_argnums=(1, 2))
    np.testing.assert_array_equal(np.asarray(unpack(codes, bits, n)), idx)


def test_pytree_jit_device_put_and_sharding():
  params = _params()
  spec = bq.quant_spec(params, bits=2, per_channel=True)
  packed = bq.pack_params(params, spec)
  want = bq.quantize_params(params, spec)
  leaves, treedef = jax.tree.flatten(packed)
  # Children: codes and scale per packed leaf; shape, dtype and spec are static.
  assert len(leaves) == 2 * 3 + 2
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(packed)[0]]
  assert "['dense']['kernel'].codes" in paths and "['dense']['kernel'].scale" in paths
  again = jax.tree.unflatten(treedef, leaves)
  assert again["dense"]["kernel"].spec == spec["dense"]["kernel"]
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  P = jax.sharding.PartitionSpec
  replicated = jax.device_put(packed, jax.sharding.NamedSharding(mesh, P()))
  assert replicated["dense"]["kernel"].codes.sharding.is_fully_replicated
  out = jax.jit(bq.dequantize_tree)(replicated)
  chex.assert_trees_all_equal(as_bits(out), as_bits(want))
  # Codes sharded over the devices (their flat byte axis), gathered by XLA.
  big = {"w": jax.random.normal(jax.random.PRNGKey(1), (64, 16))}
  big_spec = bq.quant_spec(big, bits=4)
  p = bq.pack_params(big, big_spec)
  shard = jax.sharding.NamedSharding(mesh, P("data"))
  p["w"].codes = jax.device_put(p["w"].codes, shard)
  assert len(p["w"].codes.sharding.device_set) == len(jax.devices())
  chex.assert_trees_all_equal(as_bits(jax.jit(bq.dequantize_tree)(p)),
                              as_bits(bq.quantize_params(big, big_spec)))
  # Abstract evaluation keeps the static metadata.
  shapes = jax.eval_shape(bq.dequantize_tree, packed)
  assert shapes["conv"]["kernel"].shape == (3, 3, 4, 8)


def test_orbax_save_and_restore(tmp_path):
  params = _params()
  spec = bq.quant_spec(params, bits=3, scheme="log")
  params, state = _trained(params, spec)
  packed = bq.pack_params(params, spec, state=state)
  path = tmp_path / "ckpt"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, packed)
    ckptr.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, packed)
    restored = ckptr.restore(path, target)
  assert isinstance(restored["conv"]["kernel"], bq.PackedArray)
  chex.assert_trees_all_equal(as_bits(restored), as_bits(packed))
  chex.assert_trees_all_equal(as_bits(jax.jit(bq.dequantize_tree)(restored)),
                              as_bits(bq.quantize_params(params, spec, state=state)))


def test_npz_round_trip_with_extra_state(tmp_path):
  params = _params()
  spec = bq.quant_spec(params, bits=2)
  params, state = _trained(params, spec)
  packed = bq.pack_params(params, spec, state=state)
  extra = {"bn": {"mean": jnp.arange(5.0), "var": jnp.ones(5)}, "count": jnp.array(3, jnp.int32)}
  path = tmp_path / "model.npz"
  bq.save_packed(path, packed, extra=extra)
  got, got_extra = bq.load_packed_model(path, like=params, extra_like=extra)
  chex.assert_trees_all_equal(as_bits(got), as_bits(packed))
  chex.assert_trees_all_equal(got_extra, extra)
  assert got["dense"]["kernel"].spec == spec["dense"]["kernel"]
  flat, flat_extra = bq.load_packed_model(path)
  assert set(flat) == {"conv/kernel", "conv/bias", "dense/kernel", "dense/bias", "head/kernel"}
  assert set(flat_extra) == {"bn/mean", "bn/var", "count"}
  # unpack gives the parameters only, as before.
  chex.assert_trees_all_equal(as_bits(bq.unpack(path, like=params)),
                              as_bits(bq.quantize_params(params, spec, state=state)))
  lines = []
  report = bq.size_report(path, print_fn=lines.append)
  n_bytes = sum(x.nbytes for x in jax.tree.leaves(got))
  assert report["device_bytes"] == n_bytes + report["extra_bytes"]
  assert report["extra_bytes"] == 5 * 4 * 2 + 4
  assert report["file_bytes"] == path.stat().st_size
  assert any(l.startswith("file") for l in lines) and any(l.startswith("on device") for l in lines)


def test_npz_errors_name_the_file_and_leaf(tmp_path):
  params = _params()
  spec = bq.quant_spec(params, bits=2)
  path = tmp_path / "model.npz"
  bq.save_packed(path, bq.pack_params(params, spec))
  with pytest.raises(ValueError, match=r"holds no extra state"):
    bq.load_packed_model(path, like=params, extra_like={"mean": jnp.zeros(3)})
  bad = dict(params, head={"kernel": jnp.zeros((4, 3))})
  with pytest.raises(ValueError, match=r"load_packed_model\('.*model.npz'\): leaf 'head/kernel' "
                     r"was packed with shape \(5, 3\), `like` has \(4, 3\)"):
    bq.load_packed_model(path, like=bad)
  data = path.read_bytes()
  short = tmp_path / "short.npz"
  short.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match=r"'.*short.npz' is not a packed model"):
    bq.load_packed_model(short)
  with pytest.raises(ValueError, match=r"extra leaf 'key' is a PRNG key"):
    bq.save_packed(tmp_path / "k.npz", bq.pack_params(params, spec),
                   extra={"key": jax.random.key(0)})
  with pytest.raises(TypeError, match="dequantize: expected a blaq_jax.PackedArray"):
    bq.dequantize(params["dense"]["kernel"])


def test_state_of_another_width_is_refused():
  params = _params()
  _, state = _trained(params, bq.quant_spec(params, bits=1), steps=1)
  with pytest.raises(ValueError, match=r"pack_params: the optimizer state's scale for "
                     r"'.*' does not fit its spec"):
    bq.pack_params(params, bq.quant_spec(params, bits=2), state=state)


# --- Flax NNX models: the two-line serving path ----------------------------------------


def _mlp():
  return cls_models.MLP(in_features=64, hidden=(32, 16), rngs=nnx.Rngs(0)), (8, 8, 8, 1)


def _lenet():
  return cls_models.LeNet5(image_size=28, rngs=nnx.Rngs(0)), (8, 28, 28, 1)


def _resnet18():
  model = r18_models.ResNet18(num_classes=10, num_filters=4, rngs=nnx.Rngs(0))
  return model, (4, 32, 32, 3)


@pytest.mark.parametrize("build", some_slow([_mlp, _lenet, _resnet18], fast={0, 1}),
                         ids=["mlp", "lenet5", "resnet18"])
def test_nnx_model_runs_from_packed_params(build, tmp_path):
  model, x_shape = build()
  x = jax.random.normal(jax.random.PRNGKey(1), x_shape)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  spec = bq.quant_spec(params, bits=2, overrides={"head": 8})
  params, state = _trained(params, spec, steps=1)
  # Batch-norm statistics that are not the initial ones.
  rest = jax.tree.map(lambda v: v + 0.25 if v.dtype == jnp.float32 else v, rest)
  model = nnx.merge(graphdef, params, rest)
  model.eval()
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  packed = bq.pack_params(params, spec, state=state)
  forward = nnx.jit(lambda p, r, x: nnx.merge(graphdef, bq.dequantize_tree(p), r)(x))
  w_hat = bq.quantize_params(params, spec, state=state)
  reference = nnx.jit(lambda q, r, x: nnx.merge(graphdef, q, r)(x))
  chex.assert_trees_all_close(forward(packed, rest, x), reference(w_hat, rest, x),
                              rtol=1e-6, atol=1e-6)
  # The parameters on the device are the packed bytes.
  float_bytes = sum(v.nbytes for v in jax.tree.leaves(params))
  packed_bytes = sum(v.nbytes for v in jax.tree.leaves(packed))
  assert packed_bytes == bq.size_report(packed, print_fn=None)["device_bytes"]
  flat_spec = jax.tree.leaves(spec, is_leaf=lambda x: x is None or isinstance(x, bq.QuantSpec))
  want = sum(w.nbytes if s is None else -(-w.size * s.bits // 8) + 4 * (
      w.shape[-1] if s.per_channel else 1) for s, w in zip(flat_spec, jax.tree.leaves(params)))
  assert packed_bytes == want < float_bytes / 4
  # The file holds everything: a model rebuilt from it evaluates the same.
  path = tmp_path / "model.npz"
  bq.save_packed(path, packed, extra=rest)
  fresh_graphdef, fresh_params, fresh_rest = nnx.split(nnx.eval_shape(lambda: build()[0]),
                                                       nnx.Param, ...)
  loaded, loaded_rest = bq.load_packed_model(path, like=fresh_params, extra_like=fresh_rest)
  chex.assert_trees_all_equal(forward(loaded, loaded_rest, x), forward(packed, rest, x))
