"""Fully sharded training on 8 simulated CPU devices (float64): params,
optimizer state and batch split over one mesh axis by ``jax.jit`` and
``NamedSharding``, the state laid out by :func:`blaq_jax.shard_like`.

In float64 the reduction order of the sharded sums changes the results by
rounding only, so FSDP training equals single-device training to 1e-12.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import blaq_jax as bq
from helpers import end_to_end, multi_device, run_two_processes, some_slow

pytestmark = multi_device

STEPS = 4
AXIS = "fsdp"


def _problem():
  rng = np.random.default_rng(0)
  params = {"l1": {"kernel": rng.normal(size=(32, 64)) * 0.3, "bias": np.zeros(64)},
            "l2": {"kernel": rng.normal(size=(64, 32)) * 0.2, "bias": np.zeros(32)},
            "l3": {"kernel": rng.normal(size=(32, 8)) * 0.2, "bias": np.zeros(8)}}
  x, y = rng.normal(size=(64, 32)), rng.normal(size=(64, 8))
  return jax.tree.map(jnp.asarray, params), jnp.asarray(x), jnp.asarray(y)


def _loss(p, x, y):
  if jax.sharding.get_abstract_mesh().are_all_axes_explicit:
    # FSDP under explicit axes: the model gathers its (sharded) weights.
    p = jax.tree.map(lambda w: jax.sharding.reshard(w, P()), p)
  h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
  h = jnp.tanh(h @ p["l2"]["kernel"] + p["l2"]["bias"])
  return jnp.mean((h @ p["l3"]["kernel"] + p["l3"]["bias"] - y) ** 2)


SCALES = {"tensor": {}, "channel": {"per_channel": True}, "group": {"group_size": 4},
          # At 4 bits a group of 4 weights has more levels than weights: many
          # scales fit it almost exactly, so which one the warm fit keeps is
          # decided by rounding, and the sharded sums' order changes it.
          "group16": {"group_size": 16}}
ALGOS = {
    "laq": (lambda spec: bq.laq(1e-2, spec), lambda t: False),
    "blaq": (lambda spec: bq.blaq(1e-2, spec, a=0.6), lambda t: True),
    # The paper's period, decided on the host: grad_fn=None on the off steps.
    "blaq_m2": (lambda spec: bq.blaq(1e-2, spec, a=0.6), lambda t: t % 2 == 1),
}


def _setup(algo, scales, bits=2):
  params, x, y = _problem()
  spec = bq.quant_spec(params, bits, **SCALES[scales])
  make, active = ALGOS[algo]
  return params, x, y, spec, make(spec), active


def _steps(tx, spec):
  def make(active):
    def step(params, opt_state, x, y):
      q = bq.quantize_params(params, spec, state=opt_state)
      g = jax.grad(_loss)(q, x, y)
      grad_fn = (lambda p: jax.grad(_loss)(p, x, y)) if active else None
      updates, opt_state = tx.update(g, opt_state, params, grad_fn=grad_fn)
      return optax.apply_updates(params, updates), opt_state
    return jax.jit(step)
  return {a: make(a) for a in (False, True)}


def _mesh(n, axis_type=AxisType.Auto):
  if len(jax.devices()) < n:
    pytest.skip(f"needs {n} (simulated) devices")
  return jax.make_mesh((n,), (AXIS,), axis_types=(axis_type,), devices=jax.devices()[:n])


def _fsdp_sharding(params, mesh):
  """Every leaf split along its first axis where the mesh divides it."""
  return jax.tree.map(
      lambda w: NamedSharding(mesh, P(AXIS) if w.shape[0] % mesh.size == 0 else P()), params)


def _train(params, x, y, tx, spec, active, mesh=None):
  if mesh is None:
    opt_state = tx.init(params)
  else:
    params_sharding = _fsdp_sharding(params, mesh)
    params = jax.device_put(params, params_sharding)
    state_sharding = bq.shard_like(jax.eval_shape(tx.init, params), params_sharding)
    opt_state = jax.jit(tx.init, out_shardings=state_sharding)(params)
    x, y = jax.device_put((x, y), NamedSharding(mesh, P(AXIS)))
  steps = _steps(tx, spec)
  for t in range(STEPS):
    params, opt_state = steps[active(t)](params, opt_state, x, y)
  return params, opt_state


@pytest.mark.parametrize("algo,scales,bits", some_slow(
    [("laq", "tensor", 2), ("blaq", "channel", 2), ("blaq_m2", "group", 2),
     ("blaq_m2", "group16", 4), ("laq", "channel", 2), ("laq", "group", 2),
     ("blaq", "tensor", 2), ("blaq", "group", 2), ("blaq_m2", "tensor", 2),
     ("blaq_m2", "channel", 2)], fast={0, 1, 3}))
def test_fsdp_equals_single_device_and_keeps_the_sharding(algo, scales, bits, x64):
  params, x, y, spec, tx, active = _setup(algo, scales, bits)
  ref_params, ref_state = _train(params, x, y, tx, spec, active)
  mesh = _mesh(8)
  new_params, new_state = _train(params, x, y, tx, spec, active, mesh)
  chex.assert_trees_all_close((new_params, new_state), (ref_params, ref_state),
                              atol=1e-12, rtol=0)
  chex.assert_trees_all_equal(new_state.count, jnp.asarray(STEPS, jnp.int32))
  # No silent replication: after the steps every array keeps the layout
  # shard_like gave it (jit was not told the output shardings).
  params_sharding = _fsdp_sharding(params, mesh)
  want = bq.shard_like(new_state, params_sharding)
  for got, expected in zip(jax.tree.leaves((new_params, new_state)),
                           jax.tree.leaves((params_sharding, want)), strict=True):
    assert got.sharding.is_equivalent_to(expected, got.ndim), (got.shape, got.sharding, expected)
  assert new_params["l1"]["kernel"].sharding.spec == P(AXIS)
  assert new_state.mu["l1"]["kernel"].sharding.spec == P(AXIS)
  if scales == "group":  # (32 // 4, 64): split too
    assert new_state.scale["l1"]["kernel"].sharding.spec == P(AXIS)


@pytest.mark.parametrize("algo,scales,bits", some_slow(
    [("blaq_m2", "group", 2), ("blaq", "channel", 2), ("laq", "tensor", 2),
     ("blaq_m2", "group16", 4), ("laq", "tensor", 8)], fast={0, 1}))
def test_fsdp_under_explicit_axes(algo, scales, bits, x64):
  """The same recipe on a mesh whose axis is ``AxisType.Explicit``: the
  arrays' types carry their shardings, and group scales whose group axis
  the mesh does not divide (group16: 2 groups for 8 devices) are gathered."""
  params, x, y, spec, tx, active = _setup(algo, scales, bits)
  ref = _train(params, x, y, tx, spec, active)
  mesh = _mesh(8, AxisType.Explicit)
  with jax.set_mesh(mesh):
    new_params, new_state = _train(params, x, y, tx, spec, active, mesh)
  chex.assert_trees_all_close((new_params, new_state), ref, atol=1e-12, rtol=0)
  assert jax.typeof(new_params["l1"]["kernel"]).sharding.spec == P(AXIS, None)
  assert jax.typeof(new_state.mu["l1"]["kernel"]).sharding.spec == P(AXIS, None)


def _bytes_per_device(tree):
  """The most bytes any device holds of ``tree``'s arrays (from the addressable shards)."""
  per = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
  return max(per.values())


@pytest.mark.parametrize("scales", some_slow(["group", "tensor", "channel"], fast={0}))
def test_bytes_per_device_fall_as_one_over_n(scales, x64):
  params, x, y, spec, tx, active = _setup("blaq", scales)
  replicated = sum(leaf.nbytes for leaf in jax.tree.leaves((params, tx.init(params))))
  for n in (1, 8):
    mesh = _mesh(n)
    new_params, new_state = _train(params, x, y, tx, spec, active, mesh)
    held = _bytes_per_device((new_params, new_state))
    # What cannot be split (counters, per-tensor and per-channel scales) is held whole.
    whole = sum(leaf.nbytes for leaf in jax.tree.leaves((new_params, new_state))
                if leaf.sharding.is_fully_replicated)
    assert held == (replicated - whole) // n + whole, (n, held, replicated, whole)
    assert held <= replicated / n * 1.05, (n, held, replicated)
    if n > 1:
      assert whole <= 0.01 * replicated, (n, whole, replicated)


def test_shard_like_layouts():
  mesh = _mesh(8)
  params = {"k": jax.ShapeDtypeStruct((64, 16), jnp.float32),
            "b": jax.ShapeDtypeStruct((3,), jnp.float32)}
  sharding = {"k": NamedSharding(mesh, P(AXIS, None)), "b": NamedSharding(mesh, P())}
  spec = {"k": bq.QuantSpec(2, group_size=4), "b": None}
  state = jax.eval_shape(optax.chain(optax.clip_by_global_norm(1.0), bq.blaq(0.1, spec)).init,
                         params)
  out = bq.shard_like(state, sharding)[1]
  assert out.mu["k"].spec == P(AXIS) and out.mu["b"].spec == P()
  assert out.curvature["b"] is None and out.scale["b"] is None
  assert out.scale["k"].spec == P(AXIS)                     # (16, 16)
  assert out.count.spec == P()
  spec = {"k": bq.QuantSpec(2, group_size=16), "b": None}   # (4, 16): 4 rows for 8 devices
  out = bq.shard_like(jax.eval_shape(bq.laq(0.1, spec).init, params), sharding)
  assert out.scale["k"].spec == P()
  spec = {"k": bq.QuantSpec(2, per_channel=True), "b": None}
  sharding["k"] = NamedSharding(mesh, P(None, AXIS))        # split along out
  out = bq.shard_like(jax.eval_shape(bq.laq(0.1, spec).init, params), sharding)
  assert out.scale["k"].spec == P(None, AXIS)               # (1, 16)
  with pytest.raises(TypeError, match="shard_like: params_sharding at 'k'"):
    bq.shard_like(state, {"k": jax.devices()[0], "b": None})


_TWO_PROCESS_BODY = """
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import blaq_jax as bq
import test_fsdp as t

params, x, y, spec, tx, active = t._setup("blaq_m2", "group")
mesh = jax.make_mesh((8,), (t.AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
sharding = t._fsdp_sharding(params, mesh)
# Every process builds its own shards of the params, and feeds its half of the batch.
params = jax.tree.map(
    lambda w, s: jax.make_array_from_callback(w.shape, s, lambda i: np.asarray(w)[i]),
    params, sharding)
state = jax.jit(tx.init, out_shardings=bq.shard_like(jax.eval_shape(tx.init, params),
                                                     sharding))(params)
mine = slice(32 * pid, 32 * pid + 32)
batch = NamedSharding(mesh, P(t.AXIS))
x, y = (jax.make_array_from_process_local_data(batch, np.asarray(a)[mine]) for a in (x, y))
steps = t._steps(tx, spec)
for step in range(t.STEPS):
  params, state = steps[active(step)](params, state, x, y)
assert params["l1"]["kernel"].sharding.spec == P(t.AXIS)
assert not params["l1"]["kernel"].is_fully_addressable
leaves = multihost_utils.process_allgather(jax.tree.leaves((params, state)), tiled=True)
np.savez(f"{out}/fsdp_{pid}.npz", *leaves)
"""


@end_to_end
def test_fsdp_in_two_processes(x64, tmp_path):
  """The recipe under jax.distributed: 2 processes x 4 CPU devices, one
  8-device mesh, each process holding its shards and half of the batch."""
  run_two_processes(_TWO_PROCESS_BODY, tmp_path)
  params, x, y, spec, tx, active = _setup("blaq_m2", "group")
  want = jax.tree.leaves(_train(params, x, y, tx, spec, active))
  for pid in range(2):
    with np.load(tmp_path / f"fsdp_{pid}.npz") as got:
      got = [got[f"arr_{i}"] for i in range(len(got.files))]
    chex.assert_trees_all_close(got, [np.asarray(w) for w in want], atol=1e-12, rtol=0)
