"""Bad input names itself: one line naming the argument, grad_fn, file or path.

Every case is a row of ``CASES``: ``(id, thunk, exception, regex)``. The
regex must match the message, which must be a single line.
"""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blaq_jax as bq
from blaq_jax import contrib
from blaq_jax._src import tree as tree_lib



def params():
  return {"dense": {"kernel": jnp.ones((3, 4)) * 0.1, "bias": jnp.zeros(4)},
          "head": {"kernel": jnp.ones((4, 2)) * 0.1, "bias": jnp.zeros(2)}}


def spec():
  return bq.quant_spec(params(), bits=1)


def grads():
  return jax.tree.map(jnp.ones_like, params())


def _init(factory):
  return factory(0.1, spec()).init(params())


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


def rand_params():
  """Params whose 1- and 2-bit scales differ (``params()`` is constant)."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {"dense": {"kernel": jax.random.normal(k1, (8, 6)) * 0.3, "bias": jnp.zeros(6)},
          "head": {"kernel": jax.random.normal(k2, (6, 3)) * 0.3, "bias": jnp.zeros(3)}}


def _pack_with_state_of(bits_state, bits_spec, per_channel=False):
  p = rand_params()
  state = bq.laq(0.1, bq.quant_spec(p, bits=bits_state, per_channel=per_channel)).init(p)
  return bq.pack(p, bq.quant_spec(p, bits=bits_spec), state=state)


def _quantize_params_other_state():
  other = {"w": jnp.ones((3, 3))}
  state = bq.laq(0.1, bq.quant_spec(other, bits=1)).init(other)
  return bq.quantize_params(params(), spec(), state=state)


def _truncated_file(tmp, fn):
  path = tmp / "cut.npz"
  bq.save_packed(path, bq.pack(params(), spec()))
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  return fn(path)


def _nan_params():
  p = params()
  p["dense"]["kernel"] = p["dense"]["kernel"].at[0, 0].set(jnp.nan)
  return p


def int_grads():
  g = grads()
  g["head"]["kernel"] = jnp.ones((4, 2), jnp.int32)
  return g


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
    # learning rates
    ("laq_lr_nan", lambda: bq.laq(float("nan"), spec()),
     ValueError, r"laq: learning_rate must be finite"),
    ("laq_lr_inf", lambda: bq.laq(float("inf"), spec()),
     ValueError, r"laq: learning_rate must be finite"),
    ("laq_lr_negative", lambda: bq.laq(-1.0, spec()),
     ValueError, r"laq: learning_rate must be >= 0.0, got -1.0"),
    ("laq_lr_string", lambda: bq.laq("0.1", spec()),
     TypeError, r"laq: learning_rate must be a number or a schedule"),
    ("blaq_lr_nan", lambda: bq.blaq(float("nan"), spec()),
     ValueError, r"blaq: learning_rate must be finite"),
    ("blaq_lr_negative_schedule",
     lambda: bq.blaq(optax.constant_schedule(-0.1), spec()),
     ValueError, r"blaq: learning_rate is a schedule whose value at step 0 is -0.1"),
    ("blaq_lr_nan_schedule",
     lambda: bq.blaq(lambda count: jnp.nan * count, spec()),
     ValueError, r"blaq: learning_rate is a schedule whose value at step 0 is nan"),
    ("blaq_reuse_lr_inf",
     lambda: contrib.blaq_reuse(float("inf"), spec()),
     ValueError, r"blaq_reuse: learning_rate must be finite"),
    ("blaq_model_lr_negative",
     lambda: contrib.blaq_model(-1e-3, spec()),
     ValueError, r"blaq_model: learning_rate must be >= 0.0"),
    # other hyperparameters: typed and in range
    ("blaq_a_string", lambda: bq.blaq(0.1, spec(), a="0.6"),
     TypeError, r"blaq: a must be a number in \[0, 1\], got '0.6'"),
    ("blaq_a_nan", lambda: bq.blaq(0.1, spec(), a=float("nan")),
     ValueError, r"blaq: a must be finite"),
    ("laq_b1_string", lambda: bq.laq(0.1, spec(), b1="0.9"),
     TypeError, r"laq: b1 must be a number in \[0, 1\)"),
    ("laq_b2_one", lambda: bq.laq(0.1, spec(), b2=1.0),
     ValueError, r"laq: b2 must be in \[0, 1\), got 1.0"),
    ("laq_eps_negative", lambda: bq.laq(0.1, spec(), eps=-1e-8),
     ValueError, r"laq: eps must be >= 0"),
    ("blaq_clip_nan", lambda: bq.blaq(0.1, spec(), clip=float("nan")),
     ValueError, r"blaq: clip must be finite"),
    ("laq_skip_nonfinite_string", lambda: bq.laq(0.1, spec(), skip_nonfinite="no"),
     TypeError, r"laq: skip_nonfinite must be True or False"),
    ("ste_clip_string", lambda: bq.ste(optax.adam(0.1), spec(), clip="1"),
     TypeError, r"ste: clip must be a number > 0 or None"),
    ("freezing_threshold_negative", lambda: bq.freeze_oscillations(-1, spec()),
     ValueError, r"freeze_oscillations: threshold must be >= 0.0, got -1"),
    ("freezing_threshold_nan", lambda: bq.freeze_oscillations(float("nan"), spec()),
     ValueError, r"freeze_oscillations: threshold must be finite"),
    ("dampening_weight_inf", lambda: bq.add_oscillation_dampening(float("inf"), spec()),
     ValueError, r"add_oscillation_dampening: weight must be finite"),
    ("tracking_window_string", lambda: bq.track_oscillations(spec(), window="5"),
     ValueError, r"track_oscillations: window must be an int >= 1"),
    # QuantSpec fields
    ("quantspec_per_channel_string", lambda: bq.QuantSpec(2, per_channel="yes"),
     TypeError, r"QuantSpec: per_channel must be True or False, got 'yes'"),
    ("quantspec_tol_string", lambda: bq.QuantSpec(2, tol="1e-6"),
     TypeError, r"QuantSpec: tol must be a float"),
    ("quantspec_scheme_not_str", lambda: bq.QuantSpec(2, scheme=2),
     ValueError, r"QuantSpec: unknown scheme 2"),
    ("quantspec_scheme_positional", lambda: bq.QuantSpec(2, "log"),
     TypeError, r"takes 2 positional arguments but 3 were given"),
    ("quant_spec_per_channel_string",
     lambda: bq.quant_spec(params(), bits=2, per_channel="yes"),
     TypeError, r"QuantSpec: per_channel must be True or False"),
    # quant_spec patterns
    ("include_invalid_regex", lambda: bq.quant_spec(params(), bits=1, include="dense("),
     ValueError, r"quant_spec: include='dense\(' is not a valid regular expression"),
    ("override_invalid_regex", lambda: bq.quant_spec(params(), bits=1, overrides={"[": 8}),
     ValueError, r"quant_spec: overrides key='\[' is not a valid regular expression"),
    ("overrides_not_a_dict", lambda: bq.quant_spec(params(), bits=1, overrides=[("a", 8)]),
     TypeError, r"quant_spec: overrides must be a dict"),
    # curvature
    ("quantize_negative_curvature",
     lambda: bq.quantize(jnp.ones(4), bq.QuantSpec(2), -jnp.ones(4)),
     ValueError, r"quantize: curvature has non-positive entries"),
    ("quantize_nan_curvature",
     lambda: bq.quantize(jnp.ones(4), bq.QuantSpec(2), jnp.full(4, jnp.nan)),
     ValueError, r"quantize: curvature has non-finite entries"),
    ("quantize_params_zero_curvature",
     lambda: bq.quantize_params(params(), spec(), jax.tree.map(jnp.zeros_like, params())),
     ValueError, r"quantize_params: curvature at 'dense/kernel' has non-positive entries"),
    ("quantize_params_curvature_wrong_tree",
     lambda: bq.quantize_params(params(), spec(), {"w": jnp.ones(3)}),
     ValueError, r"quantize_params: curvature does not have the tree structure of params"),
    # gradients must be floating
    ("laq_int_updates", lambda: _update(bq.laq(0.1, spec()), int_grads()),
     TypeError, r"laq.update: updates leaf 'head/kernel' has dtype int32"),
    ("grad_fn_int_gradients",
     lambda: _update(bq.blaq(0.1, spec()), grad_fn=lambda p: int_grads()),
     TypeError, r"blaq.update: grad_fn's gradients leaf 'head/kernel' has dtype int32"),
    # a state that does not belong to the spec or the model
    ("pack_state_of_other_width", lambda: _pack_with_state_of(1, 2),
     ValueError, r"pack: the optimizer state's scale for '\w+/kernel' does not fit its spec"),
    ("pack_state_of_2bit_for_1bit", lambda: _pack_with_state_of(2, 1),
     ValueError, r"pack: the optimizer state's scale for 'dense/kernel' does not fit its spec"),
    ("pack_state_per_channel", lambda: _pack_with_state_of(1, 1, per_channel=True),
     ValueError, r"pack: the optimizer state has a scale of shape \(1, 6\) for "
     r"'dense/kernel', its spec needs shape \(1, 1\)"),
    ("quantize_params_state_of_other_model", _quantize_params_other_state,
     ValueError, r"quantize_params: the optimizer state's scales do not have the tree "
     r"structure of the spec and params"),
    # unpack(like=...) shapes
    ("unpack_like_wrong_shape",
     lambda: bq.unpack(bq.pack(params(), spec()),
                       like={**params(), "head": {"kernel": jnp.ones((2, 4)),
                                                  "bias": jnp.zeros(2)}}),
     ValueError, r"unpack: leaf 'head/kernel' was packed with shape \(4, 2\), `like` has "
     r"\(2, 4\)"),
    ("size_report_edited", lambda: bq.size_report(_packed(shape=[4, 3]), print_fn=None),
     ValueError, r"size_report: leaf 'dense/kernel': its sha256 does not match"),
    ("size_report_short_codes", lambda: bq.size_report(_short_codes(), print_fn=None),
     ValueError, r"size_report: leaf 'dense/kernel'"),
    ("save_packed_not_packed", lambda: bq.save_packed("/nonexistent/x.npz", {"a": 1}),
     ValueError, r"save_packed: '/nonexistent/x.npz': packed must be the dict"),
    # blaq_jax.contrib: the core transforms' checks, with the core's messages
    ("contrib_model_grads_wrong_shape",
     lambda: _update(contrib.blaq_model(0.1, spec()), wrong_shape_grads()),
     ValueError, r"blaq_model.update: updates leaf 'dense/kernel' has shape \(4, 3\), the "
     r"param has \(3, 4\)"),
    ("contrib_reuse_grads_wrong_tree",
     lambda: _update(contrib.blaq_reuse(0.1, spec()), wrong_tree_grads(),
                     grad_fn=lambda p: grads()),
     ValueError, r"blaq_reuse.update: updates do not have the tree structure of params "
     r".*head/bias"),
    ("contrib_model_int_updates", lambda: _update(contrib.blaq_model(0.1, spec()), int_grads()),
     TypeError, r"blaq_model.update: updates leaf 'head/kernel' has dtype int32"),
    ("contrib_model_no_params",
     lambda: contrib.blaq_model(0.1, spec()).update(grads(), _init(contrib.blaq_model)),
     ValueError, r"blaq_model.update: params are required"),
    ("contrib_reuse_no_params",
     lambda: contrib.blaq_reuse(0.1, spec()).update(grads(), _init(contrib.blaq_reuse),
                                                    grad_fn=lambda p: grads()),
     ValueError, r"blaq_reuse.update: params are required"),
    ("contrib_reuse_grad_fn_missing", lambda: _update(contrib.blaq_reuse(0.1, spec())),
     ValueError, r"blaq_reuse.update: the keyword argument grad_fn is required: a function "
     r"params -> gradient"),
    ("contrib_reuse_grad_fn_not_callable",
     lambda: _update(contrib.blaq_reuse(0.1, spec()), grad_fn=3),
     TypeError, r"blaq_reuse.update: grad_fn must be a function .*; got int"),
    ("contrib_reuse_grad_fn_value_and_grad",
     lambda: _update(contrib.blaq_reuse(0.1, spec()),
                     grad_fn=lambda p: (jnp.zeros([]), grads())),
     ValueError, r"blaq_reuse.update: grad_fn returned a \(loss, grads\) pair"),
    ("contrib_reuse_grad_fn_wrong_shape",
     lambda: _update(contrib.blaq_reuse(0.1, spec()), grad_fn=lambda p: wrong_shape_grads()),
     ValueError, r"blaq_reuse.update: grad_fn's gradients leaf 'dense/kernel' has shape"),
    ("contrib_reuse_grad_fn_int_gradients",
     lambda: _update(contrib.blaq_reuse(0.1, spec()), grad_fn=lambda p: int_grads()),
     TypeError, r"blaq_reuse.update: grad_fn's gradients leaf 'head/kernel' has dtype int32"),
    ("contrib_reuse_masked",
     lambda: _update(optax.masked(contrib.blaq_reuse(0.1, spec()),
                                  jax.tree.map(lambda x: x.ndim == 2, params())),
                     grad_fn=lambda p: grads()),
     ValueError, r"blaq_reuse.update: got params with optax.MaskedNode leaves"),
    ("contrib_model_spec_none", lambda: contrib.blaq_model(0.1, None).init(params()),
     TypeError, r"blaq_model.init: spec is None; .*quant_spec\(params, bits=1\)"),
    ("contrib_reuse_spec_of_other_model",
     lambda: contrib.blaq_reuse(0.1, bq.quant_spec({"w": jnp.ones((2, 2))}, bits=1)).init(
         params()),
     ValueError, r"blaq_reuse.init: the spec tree does not match the params tree"),
    ("contrib_reuse_integer_params",
     lambda: contrib.blaq_reuse(0.1, {"w": None}).init({"w": jnp.ones(3, jnp.int32)}),
     TypeError, r"blaq_reuse.init: parameter 'w' has dtype int32"),
    ("contrib_model_b1_string", lambda: contrib.blaq_model(0.1, spec(), b1="0.9"),
     TypeError, r"blaq_model: b1 must be a number in \[0, 1\)"),
    ("contrib_reuse_b2_one", lambda: contrib.blaq_reuse(0.1, spec(), b2=1.0),
     ValueError, r"blaq_reuse: b2 must be in \[0, 1\), got 1.0"),
    ("contrib_model_eps_negative", lambda: contrib.blaq_model(0.1, spec(), eps=-1e-8),
     ValueError, r"blaq_model: eps must be >= 0"),
    ("contrib_reuse_clip_nan", lambda: contrib.blaq_reuse(0.1, spec(), clip=float("nan")),
     ValueError, r"blaq_reuse: clip must be finite"),
    ("contrib_model_a_string", lambda: contrib.blaq_model(0.1, spec(), a="0.6"),
     TypeError, r"blaq_model: a must be a number in \[0, 1\], got '0.6'"),
    ("contrib_reuse_a_two", lambda: contrib.blaq_reuse(0.1, spec(), a=2.0),
     ValueError, r"blaq_reuse: a must be in \[0, 1\], got 2.0"),
    ("contrib_model_lr_negative_schedule",
     lambda: contrib.blaq_model(optax.constant_schedule(-0.1), spec()),
     ValueError, r"blaq_model: learning_rate is a schedule whose value at step 0 is -0.1"),
    # non-finite latent weights outside jit
    ("quantize_params_nan_latent", lambda: bq.quantize_params(_nan_params(), spec()),
     ValueError, r"quantize_params: latent weight 'dense/kernel' has NaN or inf entries"),
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


@pytest.mark.parametrize("fn", [bq.unpack, bq.load_packed,
                                lambda p: bq.size_report(p, print_fn=None)],
                         ids=["unpack", "load_packed", "size_report"])
def test_truncated_file_is_named(tmp_path, fn):
  with pytest.raises(ValueError) as info:
    _truncated_file(tmp_path, fn)
  message = str(info.value)
  assert "\n" not in message, message
  assert "cut.npz" in message and "is not a packed model" in message, message


def test_save_packed_is_atomic(tmp_path, monkeypatch):
  path = tmp_path / "model.npz"
  bq.save_packed(path, bq.pack(params(), spec()))
  before = path.read_bytes()

  def broken_savez(f, **arrays):
    f.write(b"PK partial")
    raise OSError("disk full")

  monkeypatch.setattr(np, "savez", broken_savez)
  with pytest.raises(OSError, match="disk full"):
    bq.save_packed(path, bq.pack(params(), spec()))
  assert path.read_bytes() == before
  assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]  # no temporary left


def test_integer_leaves_get_no_spec():
  p = {"w": jnp.ones((3, 3)), "steps": jnp.zeros((3, 3), jnp.int32),
       "mask": jnp.ones((3, 3), bool)}
  s = bq.quant_spec(p, bits=2, include=".")
  assert s["w"] == bq.QuantSpec(2) and s["steps"] is None and s["mask"] is None


def test_quantize_params_keeps_nan_visible_under_jit():
  q = jax.jit(lambda p: bq.quantize_params(p, spec()))(_nan_params())
  assert np.isnan(q["dense"]["kernel"][0, 0])
  np.testing.assert_array_equal(q["head"]["kernel"], bq.quantize_params(params(), spec())[
      "head"]["kernel"])
  state = bq.laq(0.1, spec()).init(params())
  q = jax.jit(lambda p, s: bq.quantize_params(p, spec(), state=s))(_nan_params(), state)
  assert np.isnan(q["dense"]["kernel"][0, 0])
  assert np.all(q["dense"]["kernel"].reshape(-1)[1:] != 0)


@pytest.mark.parametrize("make", [lambda: bq.laq(0.1, spec(), eps=0.0),
                                  lambda: bq.blaq(0.1, spec(), eps=0.0)], ids=["laq", "blaq"])
def test_step_to_nonfinite_latent_is_skipped(make):
  # eps = 0 and a zero gradient: m / D = 0 / 0, the new latent weights are NaN.
  tx, p = make(), params()
  zeros = jax.tree.map(jnp.zeros_like, p)
  state = tx.init(p)
  updates, new_state = jax.jit(
      lambda s: tx.update(zeros, s, p, grad_fn=lambda _: zeros))(state)
  chex.assert_trees_all_equal(updates, zeros)
  assert int(new_state.skipped) == 1 and int(new_state.count) == 0
  chex.assert_trees_all_equal(new_state.mu, state.mu)
  chex.assert_trees_all_equal(new_state.scale, state.scale)
  # A finite step afterwards is applied.
  updates, new_state = tx.update(grads(), new_state, p, grad_fn=lambda _: grads())
  assert int(new_state.skipped) == 1 and int(new_state.count) == 1


def test_traced_hyperparameters_are_not_checked_by_value():
  # Under inject_hyperparams the learning rate is a (traced) array: accepted.
  tx = optax.inject_hyperparams(bq.laq, static_args=("spec",))(learning_rate=0.1,
                                                                spec=spec())
  state = tx.init(params())
  updates, _ = jax.jit(lambda s: tx.update(grads(), s, params()))(state)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
  # A traced NaN learning rate is not refused, but its step is skipped and counted.
  state.hyperparams["learning_rate"] = jnp.asarray(jnp.nan)
  updates, state = jax.jit(lambda s: tx.update(grads(), s, params()))(state)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params()))
  assert int(state.inner_state.skipped) == 1 and int(state.inner_state.count) == 0


@pytest.mark.parametrize("factory", [contrib.blaq_model, contrib.blaq_reuse],
                         ids=["blaq_model", "blaq_reuse"])
def test_contrib_skips_a_traced_nan_learning_rate(factory):
  # As LAQ and BLAQ do: a traced learning rate is not checked by value, and a
  # step with a NaN one is skipped and counted rather than applied.
  tx = optax.inject_hyperparams(factory, static_args=("spec",))(learning_rate=0.1,
                                                                 spec=spec())
  state = tx.init(params())
  state.hyperparams["learning_rate"] = jnp.asarray(jnp.nan)
  updates, state = jax.jit(
      lambda s: tx.update(grads(), s, params(), grad_fn=lambda p: grads()))(state)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params()))
  assert int(state.inner_state.skipped) == 1 and int(state.inner_state.count) == 0


def test_state_of_the_same_spec_still_packs():
  p = rand_params()
  s = bq.quant_spec(p, bits=2)
  tx = bq.laq(0.05, s)
  state = tx.init(p)
  for _ in range(3):
    g = jax.grad(lambda w: sum(jnp.sum(x ** 2) for x in jax.tree.leaves(w)))(
        bq.quantize_params(p, s, state=state))
    u, state = tx.update(g, state, p)
    p = optax.apply_updates(p, u)
  restored = bq.unpack(bq.pack(p, s, state=state), like=p)
  chex.assert_trees_all_equal(restored, bq.quantize_params(p, s, state=state))
