"""Group-wise scales: one scale per ``g`` consecutive weights along the input
axis (axis -2), per output channel.

Each group is its own instance of the per-tensor problem, so the references
are per group: a float64 numpy alternation run to convergence
(``benchmarks/projection.py``) and the closed form for binary codes, each run
on every group separately.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blaq_jax as bq
from benchmarks import projection as ref
from blaq_jax._src import quantizers
from helpers import some_slow

G = 4


def as_groups(x, g=G):
  """``(..., in, out)`` -> ``(g, groups)``: column ``j`` is group ``j``'s weights
  (groups in the order of the scale's ``(..., in // g, out)`` layout)."""
  x = np.asarray(x)
  lead, n_in, n_out = x.shape[:-2], x.shape[-2], x.shape[-1]
  v = x.reshape(lead + (n_in // g, g, n_out))
  v = np.moveaxis(v, -2, 0)  # (g, ..., in // g, out)
  return v.reshape(g, -1)


def kernels():
  rng = np.random.default_rng(7)
  dense = rng.normal(size=(24, 6)) * 0.05
  conv = rng.laplace(size=(3, 3, 8, 5)) * 0.05
  return [(dense, rng.uniform(0.1, 2.0, dense.shape)), (conv, rng.uniform(0.1, 2.0, conv.shape))]


def test_scale_shape():
  spec = bq.QuantSpec(4, group_size=64)
  assert quantizers.scale_shape((512, 256), spec) == (8, 256)
  assert quantizers.scale_shape((3, 3, 128, 32), spec) == (3, 3, 2, 32)
  alpha = bq.fit_scale(jnp.ones((128, 3)), bq.QuantSpec(2, group_size=32))
  assert alpha.shape == (4, 3)


@pytest.mark.parametrize("scheme", ["linear", "log"])
def test_cold_start_reaches_each_groups_best_fixed_point(scheme, x64):
  for w, d in kernels():
    for bits in range(2, 9):
      spec = bq.QuantSpec(bits, scheme=scheme, group_size=G)
      alpha = bq.fit_scale(jnp.asarray(w), spec, jnp.asarray(d))
      assert alpha.shape == w.shape[:-2] + (w.shape[-2] // G, w.shape[-1])
      # As columns: the per-channel reference of (g, groups) is per group.
      col = bq.QuantSpec(bits, scheme=scheme, per_channel=True)
      ratios = ref.error_ratios(as_groups(w), as_groups(d), col,
                                np.asarray(alpha).reshape(1, -1))
      assert ratios.max() <= 1.0 + 1e-9, (bits, w.shape, ratios.max())


def test_binary_is_the_closed_form_per_group(x64):
  for w, d in kernels():
    spec = bq.QuantSpec(1, group_size=G)
    alpha = np.asarray(bq.fit_scale(jnp.asarray(w), spec, jnp.asarray(d))).reshape(-1)
    wg, dg = as_groups(w), as_groups(d)
    np.testing.assert_allclose(alpha, np.sum(dg * np.abs(wg), 0) / np.sum(dg, 0), rtol=1e-13)
    q = np.asarray(bq.quantize(jnp.asarray(w), spec, jnp.asarray(d)))
    np.testing.assert_array_equal(as_groups(q), alpha * np.where(wg >= 0, 1.0, -1.0))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_groups_are_the_per_tensor_problem_on_each_group(bits, x64):
  """Cold and warm: the group fit equals the per-tensor fit of each group alone."""
  w, d = kernels()[1]
  spec, tensor = bq.QuantSpec(bits, group_size=G), bq.QuantSpec(bits)
  per_group = jax.vmap(lambda x, y, a=None: bq.fit_scale(x, tensor, y, a).reshape(()),
                       in_axes=(1, 1, 0))
  cold = bq.fit_scale(jnp.asarray(w), spec, jnp.asarray(d))
  wg, dg = jnp.asarray(as_groups(w)), jnp.asarray(as_groups(d))
  start = jnp.asarray(as_groups(np.repeat(np.asarray(cold), G, axis=-2))[0]) * 0.7
  warm = bq.fit_scale(jnp.asarray(w), spec, jnp.asarray(d), 0.7 * cold)
  chex.assert_trees_all_close(np.asarray(cold).reshape(-1),
                              jax.vmap(lambda x, y: bq.fit_scale(x, tensor, y).reshape(()),
                                       in_axes=(1, 1))(wg, dg), rtol=1e-12)
  chex.assert_trees_all_close(np.asarray(warm).reshape(-1), per_group(wg, dg, start),
                              rtol=1e-12)


def test_quantize_with_scale_repeats_each_groups_scale(x64):
  w, d = kernels()[0]
  spec = bq.QuantSpec(3, group_size=G)
  alpha = bq.fit_scale(jnp.asarray(w), spec, jnp.asarray(d))
  q = np.asarray(bq.quantize_with_scale(jnp.asarray(w), spec, alpha))
  a = np.asarray(alpha).reshape(1, -1)
  want = a * ref.nearest_code_np(as_groups(w) / a, spec)
  np.testing.assert_allclose(as_groups(q), want, rtol=1e-14)


def test_bad_group_sizes_are_named():
  with pytest.raises(ValueError, match="group_size must be"):
    bq.QuantSpec(2, group_size=0)
  with pytest.raises(TypeError, match="group_size"):
    bq.QuantSpec(2, group_size=True)
  params = {"enc": {"kernel": jnp.zeros((30, 8))}, "head": {"kernel": jnp.zeros((32, 4))},
            "bias": jnp.zeros(8)}
  with pytest.raises(ValueError, match=r"quant_spec: .*size 30.*'enc/kernel'.*\(30, 8\)"):
    bq.quant_spec(params, 2, group_size=16)
  with pytest.raises(ValueError, match="'enc/kernel'"):  # an int override keeps group_size
    bq.quant_spec(params, 2, group_size=16, overrides={"enc": 4})
  spec = bq.quant_spec(params, 2, group_size=16, overrides={"enc": bq.QuantSpec(4)})
  assert spec["head"]["kernel"].group_size == 16 and spec["enc"]["kernel"].group_size is None
  assert spec["bias"] is None
  with pytest.raises(ValueError, match="input axis.*'bias'"):
    bq.quant_spec(params, 2, group_size=4, include=".")
  with pytest.raises(ValueError, match="laq.init: .*'x'"):
    bq.laq(0.1, {"x": bq.QuantSpec(2, group_size=3)}).init({"x": jnp.zeros((8, 2))})


def _mlp():
  rng = np.random.default_rng(0)
  params = {"l1": {"kernel": rng.normal(size=(8, 16)) * 0.5, "bias": np.zeros(16)},
            "l2": {"kernel": rng.normal(size=(16, 3)) * 0.5, "bias": np.zeros(3)}}
  x, y = rng.normal(size=(32, 8)), rng.normal(size=(32, 3))

  def loss(p):
    h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    return jnp.mean((h @ p["l2"]["kernel"] + p["l2"]["bias"] - y) ** 2)

  return jax.tree.map(jnp.asarray, params), loss


def _train(tx, spec, params, loss, steps, active=lambda t: True):
  state = tx.init(params)

  def step(params, state, on):
    g = jax.grad(loss)(bq.quantize_params(params, spec, state=state))
    u, state = tx.update(g, state, params, grad_fn=jax.grad(loss) if on else None)
    return optax.apply_updates(params, u), state

  step = jax.jit(step, static_argnums=2)
  for t in range(steps):
    params, state = step(params, state, active(t))
  return params, state


@pytest.mark.parametrize("bits", some_slow([2, 4], fast={0}))
def test_laq_and_blaq_keep_group_scales(bits, x64):
  params, loss = _mlp()
  spec = bq.quant_spec(params, bits, group_size=G)
  p0, s0 = _train(bq.laq(1e-2, spec), spec, params, loss, 6)
  assert s0.scale["l1"]["kernel"].shape == (8 // G, 16)
  assert s0.scale["l2"]["kernel"].shape == (16 // G, 3)
  assert s0.scale["l1"]["bias"] is None
  # The state's scale is the warm fit of each group's problem at the new w and D.
  d = bq.curvature(s0)["l2"]["kernel"]
  q = bq.quantize_params(p0, spec, state=s0)["l2"]["kernel"]
  a = np.asarray(s0.scale["l2"]["kernel"]).reshape(1, -1)
  w = as_groups(p0["l2"]["kernel"])
  np.testing.assert_allclose(as_groups(q), a * ref.nearest_code_np(w / a, spec["l2"]["kernel"]),
                             rtol=1e-14)
  col = bq.QuantSpec(bits, per_channel=True)
  assert ref.error_ratios(w, as_groups(d), col, a).max() <= 1.05
  # The group scales pack and serve bit for bit, in memory and through a file.
  q_all = bq.quantize_params(p0, spec, state=s0)
  chex.assert_trees_all_equal(bq.dequantize_tree(bq.pack_params(p0, spec, state=s0)), q_all)
  chex.assert_trees_all_equal(bq.unpack(bq.pack(p0, spec, state=s0), like=p0), q_all)
  # BLAQ with a = 1 is LAQ bit for bit, with group scales too.
  p1, s1 = _train(bq.blaq(1e-2, spec, a=1.0), spec, params, loss, 6)
  chex.assert_trees_all_equal((p0, s0.mu, s0.nu, s0.scale), (p1, s1.mu, s1.nu, s1.scale))
  # And BLAQ with its period (grad_fn=None on the off steps) trains.
  p2, s2 = _train(bq.blaq(1e-2, spec, a=0.6), spec, params, loss, 6, lambda t: t % 2 == 1)
  assert float(loss(bq.quantize_params(p2, spec, state=s2))) < float(
      loss(bq.quantize_params(params, spec)))
  chex.assert_trees_all_equal_shapes(s2.scale, s0.scale)


def test_abstract_init_has_group_scale_shapes():
  params = {"k": jax.ShapeDtypeStruct((16, 4), jnp.float32)}
  spec = {"k": bq.QuantSpec(2, group_size=8)}
  state = bq.laq(0.1, spec).init(params)
  assert state.scale["k"].shape == (2, 4)


def test_ste_family_uses_group_scales(x64):
  params, loss = _mlp()
  spec = bq.quant_spec(params, 2, group_size=G)
  w = params["l1"]["kernel"]
  s = spec["l1"]["kernel"]
  q = bq.ste_quantize_params(params, spec)["l1"]["kernel"]
  alpha = bq.fit_scale(w, s)
  np.testing.assert_array_equal(q, bq.quantize_with_scale(w, s, alpha))
  np.testing.assert_array_equal(q, bq.quantize(w, s))
  # The straight-through derivative is the identity.
  g = jax.grad(lambda p: jnp.sum(bq.ste_quantize_params(p, spec)["l1"]["kernel"] * 3.0))(params)
  np.testing.assert_array_equal(g["l1"]["kernel"], jnp.full(w.shape, 3.0))
  # Dampening adds 2 λ (w - Q(w)) with the group-wise Q.
  damp = bq.add_oscillation_dampening(0.5, spec)
  zeros = jax.tree.map(jnp.zeros_like, params)
  u, _ = damp.update(zeros, damp.init(params), params)
  np.testing.assert_allclose(u["l1"]["kernel"], 2 * 0.5 * (w - q), rtol=1e-14)
  # Freezing and the diagnostics chain after a group-wise STE optimizer.
  tx = optax.chain(bq.ste(optax.adam(1e-2), spec), bq.freeze_oscillations(0.2, spec),
                   bq.track_oscillations(spec, window=2))
  state = tx.init(params)
  step = jax.jit(lambda p, st: (lambda u, st: (optax.apply_updates(p, u), st))(
      *tx.update(jax.grad(loss)(bq.ste_quantize_params(p, spec)), st, p)))
  for _ in range(4):
    params, state = step(params, state)
  stats = bq.oscillation_stats(state)
  assert np.isfinite(float(stats["all/flip_frequency"]))
  codes = state[2].codes["l1"]["kernel"]
  np.testing.assert_array_equal(codes, quantizers.integer_codes(params["l1"]["kernel"], s))
