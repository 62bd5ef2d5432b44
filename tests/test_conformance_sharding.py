"""Explicit-axis sharding (8 simulated CPU devices): the state takes the
params' shardings, and a jitted step keeps them (no ShardingTypeError)."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import blaq_jax as bq
from helpers import multi_device

pytestmark = multi_device


FACTORIES = {
    "laq": lambda s: bq.laq(0.05, s),
    "blaq": lambda s: bq.blaq(0.05, s),
    "ste_adam": lambda s: bq.ste(optax.adam(0.05), s),
    "dampening_ste": lambda s: bq.ste(optax.chain(bq.add_oscillation_dampening(1e-3, s),
                                                  optax.adam(0.05)), s),
    "ste_freezing": lambda s: optax.chain(bq.ste(optax.adam(0.05), s),
                                          bq.freeze_oscillations(0.5, s)),
    "ste_tracking": lambda s: optax.chain(bq.ste(optax.adam(0.05), s),
                                          bq.track_oscillations(s, window=2)),
}


def _mesh():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (simulated) devices")
  return jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))


# (bits, quant_spec options): the multi-bit fits reshape and sample the
# weights, which explicit sharding types must allow.
SCALES = {"1bit": (1, {}), "2bit": (2, {}), "2bit_channel": (2, {"per_channel": True}),
          "2bit_group": (2, {"group_size": 4})}
CASES = [(f, s) for f in FACTORIES for s in (SCALES if f in ("laq", "blaq") else ["1bit"])]


@pytest.mark.parametrize("name,scales", CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_explicit_sharding_is_kept(name, scales):
  make, laq_like = FACTORIES[name], name in ("laq", "blaq")
  bits, options = SCALES[scales]
  mesh = _mesh()
  with jax.set_mesh(mesh):
    params = {"w": jax.device_put(0.1 * jnp.arange(32.).reshape(8, 4) - 1.0,
                                  NamedSharding(mesh, P("x"))),
              "b": jax.device_put(jnp.zeros(4), NamedSharding(mesh, P()))}
    spec = bq.quant_spec(params, bits=bits, **options)
    tx = make(spec)
    state = tx.init(params)
    target = {"w": jnp.ones((8, 4)), "b": jnp.ones(4)}

    @jax.jit
    def step(params, state):
      if laq_like:  # the LAQ/BLAQ forward: the loss-aware projection with D
        q = bq.quantize_params(params, spec, bq.curvature(state))
      else:
        q = bq.ste_quantize_params(params, spec)
      g = jax.grad(lambda p: sum(jnp.sum((a - t) ** 2) for a, t in
                                 zip(jax.tree.leaves(p), jax.tree.leaves(target))))(q)
      # Gradients may come with another sharding than the params (here
      # replicated, as from a replicated forward pass); optax.adam accepts that.
      g = jax.tree.map(lambda x: jax.sharding.reshard(x, P()), g)
      grad_fn = lambda p: jax.tree.map(jnp.ones_like, p)
      updates, state = tx.update(g, state, params, grad_fn=grad_fn)
      return optax.apply_updates(params, updates), state

    new_params, new_state = step(params, state)
    new_params, new_state = step(new_params, new_state)
    w_spec = jax.typeof(params["w"]).sharding.spec
    assert jax.typeof(new_params["w"]).sharding.spec == w_spec
    chex.assert_trees_all_equal_structs(new_state, state)
    # Every state array shaped like w carries w's sharding, before and after a step.
    for s in (state, new_state):
      for leaf in jax.tree.leaves(s):
        if leaf.shape == (8, 4):
          assert jax.typeof(leaf).sharding.spec == w_spec, jax.typeof(leaf)
