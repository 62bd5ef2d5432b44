"""Bad input names itself: one line naming the argument, grad_fn, file or path.

Every case is a row of ``CASES``: ``(id, thunk, exception, regex)``. The
regex must match the message, which must be a single line.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blaq_jax as bq
from blaq_jax._src import tree as tree_lib



def params():
  return {"dense": {"kernel": jnp.ones((3, 4)) * 0.1, "bias": jnp.zeros(4)},
          "head": {"kernel": jnp.ones((4, 2)) * 0.1, "bias": jnp.zeros(2)}}


def spec():
  return bq.quant_spec(params(), bits=1)


def grads():
  return jax.tree.map(jnp.ones_like, params())


def _update(tx, g=None, **kw):
  p = params()
  return tx.update(grads() if g is None else g, tx.init(p), p, **kw)


def _packed(**edit):
  packed = bq.pack(params(), spec())
  meta = json.loads(bytes(packed["__meta__"]).decode())
  entry = next(e for e in meta if e["path"] == "dense/kernel")
  for k, v in edit.items():
    if k == "bits":
      entry["spec"]["bits"] = v
    else:
      entry[k] = v
  packed["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  return packed


def _short_codes():
  packed = bq.pack(params(), spec())
  packed["dense/kernel::codes"] = packed["dense/kernel::codes"][:-1]
  return packed


def _not_npz(tmp):
  path = tmp / "model.npz"
  path.write_text("not a zip")
  return bq.unpack(path)


def wrong_shape_grads():
  g = grads()
  g["dense"]["kernel"] = jnp.ones((4, 3))
  return g


def wrong_tree_grads():
  g = grads()
  del g["head"]["bias"]
  return g



CASES = [
    # quant_spec
    ("include_matches_nothing",
     lambda: bq.quant_spec(params(), bits=1, include="conv"),
     ValueError, r"quant_spec: include='conv' matches no parameter path.*dense/bias"),
    ("override_typo",
     lambda: bq.quant_spec(params(), bits=1, overrides={"haed": 8}),
     ValueError, r"quant_spec: override pattern 'haed' matches no parameter path"),
    ("override_only_excluded_leaves",
     lambda: bq.quant_spec(params(), bits=1, overrides={"head/bias": 8}),
     ValueError, r"override 'head/bias' matches only leaves that include= leaves in full "
     r"precision .*widen include="),
    ("per_channel_on_1d_leaf",
     lambda: bq.quant_spec(params(), bits=1, include="dense", per_channel=True),
     ValueError, r"per_channel spec on 'dense/bias' of shape \(4,\).*per_channel=False"),
    ("include_wrong_type",
     lambda: bq.quant_spec(params(), bits=1, include=3),
     TypeError, r"quant_spec: include must be"),
    # spec argument
    ("spec_none_laq", lambda: bq.laq(0.1, None).init(params()),
     TypeError, r"laq.init: spec is None; .*quant_spec\(params, bits=1\)"),
    ("spec_bare_quantspec_blaq", lambda: bq.blaq(0.1, bq.QuantSpec(1)).init(params()),
     TypeError, r"blaq.init: spec is a bare QuantSpec; .*quant_spec"),
    ("spec_none_ste", lambda: bq.ste(optax.adam(0.1), None),
     TypeError, r"ste: spec is None"),
    ("spec_none_freezing", lambda: bq.freeze_oscillations(0.1, None),
     TypeError, r"freeze_oscillations: spec is None"),
    ("spec_bare_quantize_params",
     lambda: bq.quantize_params(params(), bq.QuantSpec(1)),
     TypeError, r"quantize_params: spec is a bare QuantSpec"),
    ("spec_of_other_model",
     lambda: bq.laq(0.1, bq.quant_spec({"w": jnp.ones((2, 2))}, bits=1)).init(params()),
     ValueError, r"laq.init: the spec tree does not match the params tree \(paths only in "
     r"params: \['dense/bias'"),
    ("spec_leaf_not_a_quantspec",
     lambda: bq.ste(optax.adam(0.1), jax.tree.map(lambda _: 1, params())).init(params()),
     TypeError, r"ste.init: spec leaves must be QuantSpec or None; bad at \['dense/bias'"),
    # updates / grads of the wrong shape or tree
    ("ste_grads_wrong_shape",
     lambda: _update(bq.ste(optax.adam(0.1), spec()), wrong_shape_grads()),
     ValueError, r"ste.update: updates leaf 'dense/kernel' has shape \(4, 3\), the param "
     r"has \(3, 4\)"),
    ("freezing_grads_wrong_tree",
     lambda: _update(bq.freeze_oscillations(0.1, spec()), wrong_tree_grads()),
     ValueError, r"freeze_oscillations.update: updates do not have the tree structure of "
     r"params .*head/bias"),
    ("laq_grads_wrong_shape",
     lambda: _update(bq.laq(0.1, spec()), wrong_shape_grads()),
     ValueError, r"laq.update: updates leaf 'dense/kernel' has shape"),
    # grad_fn
    ("grad_fn_value_and_grad",
     lambda: _update(bq.blaq(0.1, spec()),
                     grad_fn=lambda p: (jnp.zeros([]), grads())),
     ValueError, r"blaq.update: grad_fn returned a \(loss, grads\) pair"),
    ("grad_fn_wrong_tree",
     lambda: _update(bq.blaq(0.1, spec()), grad_fn=lambda p: wrong_tree_grads()),
     ValueError, r"blaq.update: grad_fn's gradients do not have the tree"),
    ("grad_fn_wrong_shape",
     lambda: _update(bq.blaq(0.1, spec()), grad_fn=lambda p: wrong_shape_grads()),
     ValueError, r"blaq.update: grad_fn's gradients leaf 'dense/kernel' has shape"),
    ("blaq_grad_fn_not_callable", lambda: _update(bq.blaq(0.1, spec()), grad_fn=3),
     TypeError, r"blaq.update: grad_fn must be a function .* or None"),
    # the helper blaq calls on grad_fn's result, directly
    ("check_grad_fn_result_pair",
     lambda: tree_lib.check_grad_fn_result((1.0, grads()), params(), "blaq.update"),
     ValueError, r"blaq.update: grad_fn returned a \(loss, grads\) pair; .*jax.grad"),
    ("check_grad_fn_result_shape",
     lambda: tree_lib.check_grad_fn_result(wrong_shape_grads(), params(), "blaq.update"),
     ValueError, r"blaq.update: grad_fn's gradients leaf 'dense/kernel' has shape \(4, 3\)"),
    # hyperparameters
    ("ste_clip", lambda: bq.ste(optax.adam(0.1), spec(), clip=0.0),
     ValueError, r"ste: clip must be > 0 or None, got 0.0"),
    ("dampening_weight", lambda: bq.add_oscillation_dampening(-1.0, spec()),
     ValueError, r"add_oscillation_dampening: weight must be >= 0"),
    ("freezing_momentum", lambda: bq.freeze_oscillations(0.1, spec(), momentum=2.0),
     ValueError, r"freeze_oscillations: momentum must be in \(0, 1\]"),
    ("tracking_window", lambda: bq.track_oscillations(spec(), window=0),
     ValueError, r"track_oscillations: window must be an int >= 1"),
    ("integer_params", lambda: bq.laq(0.1, {"w": None}).init({"w": jnp.ones(3, jnp.int32)}),
     TypeError, r"laq.init: parameter 'w' has dtype int32"),
    # export
    ("unpack_short_codes", lambda: bq.unpack(_short_codes()),
     ValueError, r"unpack: leaf 'dense/kernel': .*corrupted or was edited"),
    ("unpack_edited_shape", lambda: bq.unpack(_packed(shape=[4, 3])),
     ValueError, r"unpack: leaf 'dense/kernel': its sha256 does not match"),
    ("unpack_edited_bits", lambda: bq.unpack(_packed(bits=2)),
     ValueError, r"unpack: leaf 'dense/kernel': its sha256 does not match"),
    ("unpack_edited_dtype", lambda: bq.unpack(_packed(dtype="float16")),
     ValueError, r"unpack: leaf 'dense/kernel': its sha256 does not match"),
    ("unpack_invalid_dtype", lambda: bq.unpack(_packed(dtype="int8")),
     ValueError, r"unpack: leaf 'dense/kernel': shape \(3, 4\) / dtype int8 are not valid"),
    ("unpack_like_mismatch", lambda: bq.unpack(bq.pack(params(), spec()), like={"w": 1}),
     ValueError, r"unpack: the packed model does not match `like` \(paths missing from "
     r"the packed model: \['w'\]"),
    ("unpack_not_packed", lambda: bq.unpack({"x": np.zeros(1)}),
     ValueError, r"unpack: not a packed model"),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in CASES])
def test_bad_input_names_itself(case):
  _, thunk, exc, pattern = case
  with pytest.raises(exc) as info:
    thunk()
  message = str(info.value)
  assert "\n" not in message, message
  assert __import__("re").search(pattern, message), message


def test_unpack_names_the_file(tmp_path):
  with pytest.raises(ValueError) as info:
    _not_npz(tmp_path)
  message = str(info.value)
  assert "\n" not in message
  assert "model.npz" in message and "is not a packed model written by" in message
  path = tmp_path / "short.npz"
  bq.save_packed(path, _short_codes())
  with pytest.raises(ValueError, match=r"unpack\('.*short.npz'\): leaf 'dense/kernel'"):
    bq.unpack(path)


def test_intact_packed_data_still_loads():
  restored = bq.unpack(_packed(), like=params())
  np.testing.assert_array_equal(restored["head"]["bias"], params()["head"]["bias"])
