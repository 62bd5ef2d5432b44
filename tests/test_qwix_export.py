"""Export to qwix's quantized-array layout (optional: needs the qwix extra)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import blaq_jax as bq
from examples.classification import models as cls_models


def _params():
  k = jax.random.split(jax.random.PRNGKey(0), 2)
  return {"dense": {"kernel": jax.random.normal(k[0], (12, 6)), "bias": jnp.zeros(6)},
          "conv": {"kernel": jax.random.normal(k[1], (3, 3, 2, 4)) * 0.1}}


@pytest.mark.parametrize("kwargs,why", [
    (dict(bits=1), r"to_qwix: leaf '(dense|conv)/kernel' is 1-bit: its codes ±1 have no zero"),
    (dict(bits=3, scheme="log"), r"to_qwix: leaf '(dense|conv)/kernel' has log codes"),
])
def test_formats_qwix_cannot_hold_are_refused(kwargs, why):
  params = _params()
  with pytest.raises(ValueError, match=why):
    bq.to_qwix(params, bq.quant_spec(params, **kwargs))


def _qwix():
  return pytest.importorskip(
      "qwix", reason="qwix is not installed (pip install 'blaq_jax[qwix]'); the export "
      "cannot be checked against it")


@pytest.mark.parametrize("kwargs", [dict(bits=2, scheme="ternary"), dict(bits=3),
                                    dict(bits=4, per_channel=True), dict(bits=5),
                                    dict(bits=8, per_channel=True)],
                         ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_qarrays_dequantize_to_w_hat(kwargs):
  qwix = _qwix()
  params = _params()
  spec = bq.quant_spec(params, **kwargs)
  tx = bq.laq(1e-2, spec)
  state = tx.init(params)
  exported = bq.to_qwix(params, spec, state=state)
  w_hat = bq.quantize_params(params, spec, state=state)
  q = exported["dense"]["kernel"]
  assert isinstance(q, qwix.QArray) and q.zero_point is None
  assert q.qvalue.dtype == (jnp.int4 if kwargs["bits"] <= 4 else jnp.int8)
  assert q.scale.shape == ((1, 6) if kwargs.get("per_channel") else (1, 1))
  n = 2 ** (kwargs["bits"] - 1) - 1
  assert int(jnp.max(jnp.abs(q.qvalue.astype(jnp.int32)))) <= n
  chex.assert_trees_all_equal(exported["dense"]["bias"], params["dense"]["bias"])
  for path in (("dense", "kernel"), ("conv", "kernel")):
    got = qwix.dequantize(exported[path[0]][path[1]])
    chex.assert_trees_all_close(got, w_hat[path[0]][path[1]], rtol=3e-7, atol=0)


# qwix 0.1.8 uses flax APIs that flax 0.12 deprecates (Module.iter_modules,
# Variable.value); those warnings are qwix's.
@pytest.mark.filterwarnings("ignore::DeprecationWarning:qwix")
def test_qwix_ptq_model_runs_the_export():
  """qwix's serving path (a PTQ model fed pre-quantized params) gives the
  logits of the ŵ model."""
  qwix = _qwix()
  model = cls_models.MLP(in_features=16, hidden=(32,), rngs=nnx.Rngs(0))
  model.eval()
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 16))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  spec = bq.quant_spec(params, bits=4, per_channel=True)
  state = bq.laq(1e-2, spec).init(params)
  w_hat = bq.quantize_params(params, spec, state=state)
  want = nnx.merge(graphdef, w_hat, rest)(x)

  rules = [qwix.QuantizationRule(module_path=".*", weight_qtype=jnp.int4)]
  ptq = qwix.quantize_model(nnx.merge(graphdef, params, rest), qwix.PtqProvider(rules), x)
  is_q = lambda q: isinstance(q, qwix.QArray)
  exported = nnx.to_pure_dict(bq.to_qwix(params, spec, state=state))
  # A PTQ model holds each quantized kernel as {"array": {"qvalue", "scale"}}.
  ckpt = jax.tree.map(lambda q: {"array": {"qvalue": q.qvalue, "scale": q.scale}}
                      if is_q(q) else q, exported, is_leaf=is_q)
  nnx.update(ptq, ckpt)
  chex.assert_trees_all_close(ptq(x), want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(ptq(x)), np.asarray(model(x)), atol=1e-3)
