"""The Flax NNX way of training: nnx.Optimizer, nnx.jit, the README's example."""

import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import blaq_jax as bq

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
PRELUDE = """
import jax, jax.numpy as jnp, optax, blaq_jax as bq
x, y = jax.random.normal(jax.random.key(0), (64, 4)), jnp.ones((64, 1))
"""


def nnx_block():
  section = README.read_text().split("### Flax NNX", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_block(code):
  namespace = {}
  exec(compile(PRELUDE + code, str(README), "exec"), namespace)
  return namespace


def check_trained(ns):
  model, spec, optimizer = ns["model"], ns["spec"], ns["optimizer"]
  x, y = ns["x"], ns["y"]
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  q = bq.quantize_params(params, spec, bq.curvature(optimizer.opt_state))
  loss = float(jnp.mean((nnx.merge(graphdef, q, rest)(x) - y) ** 2))
  fresh = type(model)(nnx.Rngs(0))
  g0, p0, r0 = nnx.split(fresh, nnx.Param, ...)
  initial = float(jnp.mean((nnx.merge(g0, bq.quantize_params(p0, spec), r0)(x) - y) ** 2))
  assert loss < 0.5 * initial, (initial, loss)
  assert len(np.unique(np.asarray(q["l1"]["kernel"]))) <= 2  # 1-bit ŵ
  assert int(optimizer.step[...]) == 100


def test_readme_nnx_example_runs_as_written():
  code = nnx_block()
  assert "nnx.Optimizer(model, " in code and "wrt=nnx.Param" in code
  assert "optimizer.update(model, " in code and "grad_fn=" in code and "@nnx.jit" in code
  check_trained(run_block(code))


def test_readme_nnx_example_with_curvature_form():
  """The same loop with the (still supported) forward quantize_params(.., curvature(state))."""
  code = nnx_block().replace("state=optimizer.opt_state",
                             "bq.curvature(optimizer.opt_state)")
  check_trained(run_block(code))


class Net(nnx.Module):

  def __init__(self, rngs):
    self.body = nnx.Linear(3, 4, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)
    self.norm = nnx.LayerNorm(2, rngs=rngs)

  def __call__(self, x):
    return self.norm(self.head(jnp.tanh(self.body(x))))


def test_nnx_paths_have_no_value_suffix_and_overrides_match():
  model = Net(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  spec = bq.quant_spec(state, bits=1, overrides={"head/kernel$": 4})
  assert spec["head"]["kernel"] == bq.QuantSpec(4)
  tx = optax.chain(bq.laq(0.01, spec), bq.track_oscillations(spec))
  opt_state = tx.init(state)
  stats = bq.oscillation_stats(opt_state)
  assert "head/kernel/flips" in stats and "body/kernel/flips" in stats
  assert not any("value" in k for k in stats)
  packed = bq.pack(state, spec)
  assert "head/kernel::codes" in packed


@pytest.mark.parametrize("make", [
    lambda s: bq.laq(0.01, s),
    lambda s: optax.chain(bq.ste(optax.adam(0.01), s), bq.freeze_oscillations(0.5, s),
                          bq.track_oscillations(s)),
], ids=["laq", "ste_freezing_tracking"])
def test_nnx_optimizer_state_and_spec_from_state(make):
  """A spec built from nnx.state (Variables) works with nnx.Optimizer, which
  passes Variable-wrapped params to init and pure ones to update."""
  model = Net(nnx.Rngs(0))
  spec = bq.quant_spec(nnx.state(model, nnx.Param), bits=1)
  optimizer = nnx.Optimizer(model, make(spec), wrt=nnx.Param)
  x = jnp.ones((5, 3))

  @nnx.jit
  def step(model, optimizer):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x) ** 2)
    q = bq.ste_quantize_params(params, spec)
    optimizer.update(model, jax.grad(loss)(q))

  before = nnx.state(model, nnx.Param)
  before = jax.tree.map(jnp.copy, nnx.to_pure_dict(before))
  step(model, optimizer)
  step(model, optimizer)
  after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert not np.allclose(after["head"]["kernel"], before["head"]["kernel"])
  # curvature / oscillation_stats find their states in the nnx.Optimizer's opt_state.
  if isinstance(optimizer.opt_state, bq.LAQState) or bq.LAQState in [
      type(s) for s in jax.tree.leaves(nnx.as_pure(optimizer.opt_state),
                                       is_leaf=lambda s: isinstance(s, bq.LAQState))]:
    d = bq.curvature(optimizer.opt_state)
    assert d["head"]["kernel"].shape == (4, 2) and d["head"]["bias"] is None
  else:
    assert float(bq.oscillation_stats(optimizer.opt_state)["all/flips"]) >= 0


def test_nnx_state_params_direct_update_keeps_structure():
  """tx.update on Variable-wrapped params and grads (not via nnx.Optimizer)
  returns updates of the same structure."""
  model = Net(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  spec = bq.quant_spec(params, bits=1)
  for tx in (bq.laq(0.01, spec), bq.blaq(0.01, spec),
             optax.chain(bq.ste(optax.adam(0.01), spec), bq.freeze_oscillations(0.5, spec))):
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, new_state = tx.update(grads, state, params,
                                   grad_fn=lambda p: jax.tree.map(jnp.ones_like, p))
    chex.assert_trees_all_equal_structs(updates, params)
    chex.assert_trees_all_equal_structs(new_state, state)
