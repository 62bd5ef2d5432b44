"""examples/methods.py: every registered method builds, steps and counts its gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blaq_jax as bq
from benchmarks import step_time
from examples import methods


def _problem():
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"w": jax.random.normal(k1, (4, 3)) * 0.3, "b": jnp.zeros(3)}
  x, y = jax.random.normal(k2, (8, 4)), jnp.ones((8, 3))
  loss = lambda p: (jnp.mean((x @ p["w"] + p["b"] - y) ** 2), None)
  return params, bq.quant_spec(params, bits=1), loss


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_every_method_takes_a_step(name):
  method = methods.get(name)
  params, spec, loss = _problem()
  options = methods.Options(blend_steps=4, lookahead_phase=0)  # blaq-m: step 0 looks ahead
  tx = method.optimizer(1e-2, spec, options)
  state = tx.init(params)
  calls = []

  def counted(p):
    calls.append(1)
    return loss(p)

  updates, state, value, _ = method.step(tx, spec, params, state, counted, options=options)
  new = optax.apply_updates(params, updates)
  assert np.isfinite(float(value)) and not np.allclose(new["w"], params["w"]), name
  q = method.weights(new, spec, state)
  distinct = np.unique(np.abs(np.asarray(q["w"]))).size
  assert (distinct == 1) == method.quantized, name   # 1 bit: ±alpha
  # Gradient evaluations: one trace of loss_fn per evaluation of this step.
  assert len(calls) == method.grad_evals(options, 1), name


def test_unknown_method_is_one_line():
  with pytest.raises(ValueError, match="unknown method 'lqa'; expected one of fp, "):
    methods.get("lqa")
  with pytest.raises(ValueError, match="unknown method 'adam'"):   # one name per method
    methods.get("adam")


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_export_is_the_packed_weights(name):
  """Method.export is bq.pack of the weights the method evaluates: unpacked,
  it gives back weights() bit for bit (every leaf float for fp)."""
  method = methods.get(name)
  params, spec, loss = _problem()
  options = methods.Options(blend_steps=4, lookahead_phase=0)
  tx = method.optimizer(1e-2, spec, options)
  state = tx.init(params)
  updates, state, _, _ = method.step(tx, spec, params, state, loss, options=options)
  params = optax.apply_updates(params, updates)
  exported = method.export(params, spec, state)
  restored = bq.unpack(exported, like=params)
  want = method.weights(params, spec, state)
  for key in params:
    np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(want[key]), name)
  meta = [e for e in __import__("json").loads(bytes(exported["__meta__"])) if "path" in e]
  assert any(e["spec"] for e in meta) == method.quantized, name


def test_step_time_methods_are_registry_entries_at_a_width():
  params, _, _ = _problem()
  chosen = step_time.parse_methods("fp,bwn-ste@2,laq@3,blaq,blaq-m,laq-noskip@1,"
                                   "blaq-noskip@1,blaq-reuse@1,blaq-model@1", bits=(1,))
  spec_for = lambda bits: bq.quant_spec(params, bits=bits)
  got = step_time.make_benches(chosen, params, lr=1e-3, a=0.6, m=4, spec_for=spec_for)
  assert [b.name for b in got] == [
      "fp", "bwn-ste@2", "laq@3", "blaq@1", "blaq-m@1", "laq-noskip@1", "blaq-noskip@1",
      "blaq-reuse@1", "blaq-model@1"]
  assert all(b.method is methods.get(b.name.partition("@")[0]) for b in got)
  assert [b.grad_evals for b in got] == [1, 1, 1, 2, 1.25, 1, 2, 1, 1]
  assert [b.period for b in got] == [1, 1, 1, 1, 4, 1, 1, 1, 1]   # blaq-m: 2 compiled steps
  assert got[2].spec["w"].bits == 3 and got[0].spec is None
  assert [b.name for b in step_time.make_benches(
      step_time.parse_methods("fp,laq", bits=(1, 2)), params, lr=1e-3, a=0.6, m=5,
      spec_for=spec_for)] == ["fp", "laq@1", "laq@2"]
  for text, message in (("laq@9", "widths are 1..8"), ("lqa", "unknown method 'lqa'"),
                        ("laq@x", "the width after @ must be an int"),
                        ("fp@1", "fp has no quantized weights"),
                        ("laq,laq@1", "laq@1 named more than once")):
    with pytest.raises(ValueError, match=f"--methods: .*{message}"):
      step_time.parse_methods(text, bits=(1,))
