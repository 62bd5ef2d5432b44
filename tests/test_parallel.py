"""Data-parallel steps (pmap and jit over a mesh) on 8 simulated CPU devices.

The equivalence tests run in float64: in float32 the sign quantizer turns
reduction-order rounding into code flips and the runs drift apart.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blaq_jax as bq
from helpers import end_to_end, max_abs_diff, multi_device, run_two_processes

pytestmark = multi_device

N_DEV = 8
STEPS = 4


def _problem():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 4))
  y = np.sin(x @ rng.normal(size=(4, 1)))
  params = {"w1": rng.normal(size=(4, 16)) * 0.5, "b1": np.zeros(16),
            "w2": rng.normal(size=(16, 1)) * 0.5, "b2": np.zeros(1)}
  return jax.tree.map(jnp.asarray, params), x, y


def _loss(p, x, y):
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2)


def _make_tx(algo, spec, axis_name):
  if algo == "blaq":
    return bq.blaq(1e-2, spec, a=0.6, batch_axis_name=axis_name)
  if algo == "blaq_every2_2bit":  # the two-stage step on steps 1, 3 (a lax.cond)
    return bq.blaq(1e-2, spec, a=0.6, batch_axis_name=axis_name,
                   lookahead_schedule=bq.periodic_lookahead(2))
  return bq.laq(1e-2, spec)


def _step_fn(tx, spec, pmean=lambda t: t):
  def step(params, opt_state, x, y):
    q = bq.quantize_params(params, spec, state=opt_state)
    loss, g = jax.value_and_grad(_loss)(q, x, y)
    g = pmean(g)
    grad_fn = lambda p: jax.grad(_loss)(p, x, y)
    updates, opt_state = tx.update(g, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), opt_state, pmean(loss)
  return step


def _bits(algo):
  return 2 if algo.endswith("2bit") else 1


def _single_device_run(algo):
  params, x, y = _problem()
  spec = bq.quant_spec(params, bits=_bits(algo))
  tx = _make_tx(algo, spec, None)
  state = tx.init(params)
  step = jax.jit(_step_fn(tx, spec))
  for _ in range(STEPS):
    params, state, _ = step(params, state, x, y)
  return params, state


def _parallel_run(algo, mode, lookahead_axis="same", data=None):
  params, x, y = data if data is not None else _problem()
  dp = bq.data_parallel(mode)
  spec = bq.quant_spec(params, bits=_bits(algo))
  axis = dp.axis_name if lookahead_axis == "same" else lookahead_axis
  tx = _make_tx(algo, spec, axis)
  state = tx.init(params)
  step = dp.parallelize(_step_fn(tx, spec, dp.pmean), batch_argnums=(2, 3))
  params, state = dp.replicate((params, state))
  xs, ys = dp.shard_batch((x, y))
  placed = jax.tree.leaves(params)[0].sharding
  for _ in range(STEPS):
    params, state, loss = step(params, state, xs, ys)
  # Outputs come back placed as inputs go in: the next call does not recompile.
  assert jax.tree.leaves(params)[0].sharding == placed
  return dp.unreplicate(params), dp.unreplicate(state), dp.unreplicate(loss)


def test_simulated_devices():
  assert jax.device_count() == N_DEV


@pytest.mark.parametrize("mode", ["pmap", "jit"])
@pytest.mark.parametrize("algo", ["blaq", "laq", "blaq_every2_2bit"])
def test_parallel_run_matches_single_device(x64, algo, mode):
  ref_params, ref_state = _single_device_run(algo)
  params, state, loss = _parallel_run(algo, mode)
  assert jax.tree.leaves(params)[0].dtype == jnp.float64
  assert jnp.shape(loss) == ()
  assert int(state.count) == STEPS
  assert max_abs_diff(params, ref_params) < 1e-12
  assert max_abs_diff(bq.curvature(state), bq.curvature(ref_state)) < 1e-12
  # The runs moved: the comparison is not between two initial points.
  assert max_abs_diff(ref_params, _problem()[0]) > 1e-3


def test_pmap_without_lookahead_pmean_differs(x64):
  """Leaving out blaq's batch_axis_name leaves g* per-device: results differ."""
  ref_params, _ = _single_device_run("blaq")
  params, _, _ = _parallel_run("blaq", "pmap", lookahead_axis=None)
  assert max_abs_diff(params, ref_params) > 1e-6


def test_replicate_init_state_and_unreplicate_roundtrip():
  params, _, _ = _problem()
  spec = bq.quant_spec(params, bits=2)
  state = bq.blaq(1e-2, spec).init(params)     # holds None leaves (curvature)
  for mode in ("pmap", "jit"):
    dp = bq.data_parallel(mode)
    placed = dp.replicate((params, state))
    leaf = jax.tree.leaves(placed)[0]
    if mode == "pmap":
      assert leaf.shape[0] == N_DEV
      assert dp.axis_name == "batch" and dp.mesh is None
    else:
      assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == N_DEV
      assert dp.axis_name is None and dp.mesh.axis_names == ("data",)
    back = dp.unreplicate(placed)
    assert jax.tree.structure(back) == jax.tree.structure((params, state))
    assert max_abs_diff(back, (params, state)) == 0.0


def test_shard_batch_layout():
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  xs = bq.data_parallel("pmap").shard_batch(x)
  assert xs.shape == (N_DEV, 2, 3)
  np.testing.assert_array_equal(np.asarray(xs).reshape(16, 3), x)
  xj = bq.data_parallel("jit").shard_batch(x)
  assert xj.shape == (16, 3)
  assert [s.data.shape for s in xj.addressable_shards] == [(2, 3)] * N_DEV
  np.testing.assert_array_equal(np.asarray(xj), x)


def test_bad_arguments():
  with pytest.raises(ValueError, match="mode"):
    bq.data_parallel("shard_map")
  mesh = jax.make_mesh((N_DEV,), ("model",))
  with pytest.raises(ValueError, match="data_axis"):
    bq.data_parallel("jit", mesh=mesh)
  with pytest.raises(ValueError, match="'x'.*divisible"):
    bq.data_parallel("pmap").shard_batch({"x": np.zeros((12, 2))})
  with pytest.raises(ValueError, match="divisible"):
    bq.data_parallel("jit").shard_batch(np.zeros((4,)))
  with pytest.raises(TypeError, match="batch_argnums"):
    bq.data_parallel("jit").parallelize(lambda a: a, batch_argnums=(-1,))


@pytest.mark.parametrize("mode", ["pmap", "jit"])
def test_pmean_psum_give_global_reductions(mode):
  dp = bq.data_parallel(mode)
  x = np.arange(16, dtype=np.float32)
  step = dp.parallelize(lambda x: (dp.psum(jnp.sum(x)), dp.pmean(jnp.mean(x))),
                        batch_argnums=0)
  total, mean = dp.unreplicate(step(dp.shard_batch(x)))
  assert float(total) == x.sum() and float(mean) == x.mean()


_TWO_PROCESS_BODY = """
import numpy as np
import test_parallel as t

for mode in ("jit", "pmap"):
  params, x, y = t._problem()
  mine = slice(16 * pid, 16 * pid + 16)          # this process's half of the batch
  p, _, _ = t._parallel_run("blaq", mode, data=(params, x[mine], y[mine]))
  flat = np.concatenate([np.ravel(v) for v in jax.tree.leaves(p)])
  np.save(f"{out}/{mode}_{pid}.npy", flat)
"""


@end_to_end
def test_two_processes_match_single_device(x64, tmp_path):
  """jax.distributed with 2 processes x 4 CPU devices, each feeding its half."""
  run_two_processes(_TWO_PROCESS_BODY, tmp_path)
  ref_params, _ = _single_device_run("blaq")
  ref = np.concatenate([np.ravel(v) for v in jax.tree.leaves(ref_params)])
  for mode in ("jit", "pmap"):
    for pid in range(2):
      got = np.load(tmp_path / f"{mode}_{pid}.npy")
      assert np.abs(got - ref).max() < 1e-12, (mode, pid)
