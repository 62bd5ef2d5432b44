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
  assert methods.get("adam") is methods.get("fp")


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


def test_step_time_names_map_to_the_registry():
  params, _, _ = _problem()
  names = ["adam", "bwn_ste_2bit", "laq_3bit", "blaq_1bit", "blaq_every4_1bit",
           "laq_noskip_1bit", "blaq_noskip_1bit", "blaq_reuse_1bit", "blaq_model_1bit"]
  got = step_time.make_methods(names, params, lr=1e-3, first_last_bits=None, a=0.6,
                               is_resnet=False)
  assert [m.method.name for m in got] == [
      "fp", "bwn-ste", "laq", "blaq", "blaq-m", "laq-noskip", "blaq-noskip", "blaq-reuse",
      "blaq-model"]
  assert [m.grad_evals for m in got] == [1, 1, 1, 2, 1.25, 1, 2, 1, 1]
  assert got[2].spec["w"].bits == 3
  with pytest.raises(ValueError, match="unknown method 'laq_9bit'"):
    step_time.make_methods(["laq_9bit"], params, lr=1e-3, first_last_bits=None, a=0.6,
                           is_resnet=False)
