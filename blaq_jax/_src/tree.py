"""Pytree helpers shared by the transforms: paths, spec mapping, validation.

Every helper here accepts the trees a Flax NNX user holds as they are: an
``nnx.State`` whose leaves are ``nnx.Variable`` s (``nnx.state(model,
nnx.Param)``), the pure ``State`` that ``nnx.Optimizer`` passes to ``update``,
and optax's placeholder of :func:`optax.tree.map_params`.
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blaq_jax._src.quantizers import QuantSpec, check_group_shape, scale_shape


def path_str(path) -> str:
  """``('layers', 0, 'kernel')``-style key path as ``"layers/0/kernel"``.

  The trailing ``.value`` of an NNX ``Variable`` is dropped, so the paths of
  ``nnx.state(model)`` and of its pure form read the same (``"linear/kernel"``).
  """
  path = tuple(path)
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  return "/".join(parts)


def is_spec_leaf(x) -> bool:
  return x is None or isinstance(x, QuantSpec)


def is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def is_params_placeholder(x) -> bool:
  """True for the stand-in params that :func:`optax.tree.map_params` passes to ``init``."""
  return type(x).__name__ == "_ParamsPlaceholder" and type(x).__module__.startswith("optax")


# --- Flax NNX ---------------------------------------------------------------


def _nnx():
  """``flax.nnx`` if it is imported (no NNX Variable can exist otherwise)."""
  return sys.modules.get("flax.nnx")


def is_variable(x) -> bool:
  """True for an NNX ``Variable`` (``nnx.Param``, ``nnx.BatchStat``, optimizer variables)."""
  nnx = _nnx()
  return nnx is not None and isinstance(x, nnx.Variable)


def _variable_value(v):
  return v.get_value() if hasattr(v, "get_value") else v.value


def unwrap(tree):
  """``tree`` with every NNX ``Variable`` replaced by its value.

  ``nnx.state(model, nnx.Param)`` becomes the pure ``State`` that
  ``nnx.Optimizer`` hands to ``tx.update`` (same keys, same paths); an
  ``nnx.Optimizer``'s ``opt_state`` becomes the plain optax state. Trees
  without Variables are returned as they are (the same object).
  """
  nnx = _nnx()
  if nnx is None:
    return tree
  leaves = jax.tree.leaves(tree, is_leaf=is_variable)
  if not any(isinstance(l, nnx.Variable) for l in leaves):
    return tree
  return jax.tree.map(lambda x: _variable_value(x) if isinstance(x, nnx.Variable) else x,
                      tree, is_leaf=is_variable)


# --- validation ---------------------------------------------------------------


def is_concrete_number(x) -> bool:
  """A Python/numpy real number (not a bool, not a traced or jax array).

  Range checks of hyperparameters run on these only, so that
  ``optax.inject_hyperparams`` (which passes jax arrays, traced under
  ``jit``) works with every numeric argument.
  """
  return isinstance(x, (numbers.Real, np.number)) and not isinstance(x, (bool, np.bool_))


def is_number(x) -> bool:
  """A concrete number or a scalar array (a hyperparameter of ``inject_hyperparams``)."""
  if is_concrete_number(x):
    return True
  return isinstance(x, (jax.Array, np.ndarray)) and jnp.ndim(x) == 0


def is_abstract(x) -> bool:
  """A ``jax.ShapeDtypeStruct`` leaf (params described by shape and dtype only)."""
  return isinstance(x, jax.ShapeDtypeStruct)


def _leaf_paths(tree, is_leaf=None) -> list[str]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [path_str(p) for p, _ in leaves]


def _param_paths(params) -> list[str]:
  return _leaf_paths(params)


def check_spec_matches(spec, params, where: str) -> None:
  """Raises a one-line ValueError/TypeError naming ``where`` and the bad path.

  Checks that ``spec`` is a tree like ``params`` (NNX Variables unwrapped)
  with a :class:`QuantSpec` or None per leaf, that no per-channel spec
  sits on a leaf with fewer than 2 axes, and that a spec's ``group_size``
  divides its leaf's input axis (axis -2). optax's ``map_params`` placeholder
  passes.
  """
  if is_params_placeholder(params):
    return
  spec, params = unwrap(spec), unwrap(params)
  check_spec_arg(spec, where, params=params)
  try:
    jax.tree.map(lambda s, p: None, spec, params, is_leaf=is_spec_leaf)
  except (ValueError, TypeError) as e:
    spec_paths = set(_leaf_paths(spec, is_spec_leaf))
    param_paths = set(_param_paths(params))
    only_p = sorted(param_paths - spec_paths)[:5]
    only_s = sorted(spec_paths - param_paths)[:5]
    detail = " ".join(str(e).split())[:200]
    raise ValueError(
        f"{where}: the spec tree does not match the params tree "
        f"(paths only in params: {only_p}; only in spec: {only_s}); "
        f"build the spec with blaq_jax.quant_spec(params, ...) from these params "
        f"[{detail}]") from None
  bad = []
  for path, s in jax.tree_util.tree_flatten_with_path(spec, is_leaf=is_spec_leaf)[0]:
    if not is_spec_leaf(s):
      bad.append(path_str(path))
  if bad:
    raise TypeError(
        f"{where}: spec leaves must be QuantSpec or None; bad at {bad[:5]}; "
        "build the spec with blaq_jax.quant_spec(params, ...)")

  def per_channel_check(path, s, w):
    if not isinstance(s, QuantSpec) or w is None or is_masked(w):
      return
    if s.group_size is not None:
      try:
        check_group_shape(jnp.shape(w), s, repr(path_str(path)))
      except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    elif s.per_channel and jnp.ndim(w) < 2:
      raise ValueError(
          f"{where}: per_channel spec on {path_str(path)!r} of shape {jnp.shape(w)} would "
          "give one scale per weight; quantize it per tensor (per_channel=False) or "
          "leave it in full precision")

  jax.tree_util.tree_map_with_path(per_channel_check, spec, params, is_leaf=is_spec_leaf)


def check_spec_arg(spec, where: str, *, params=None) -> None:
  """Rejects a ``spec`` of None, or a bare QuantSpec given for a tree of params."""
  single = params is not None and len(jax.tree.leaves(params)) == 1 and \
      jax.tree_util.treedef_is_leaf(jax.tree.structure(params))
  if spec is None or (isinstance(spec, QuantSpec) and params is not None and not single):
    what = "None" if spec is None else "a bare QuantSpec"
    raise TypeError(
        f"{where}: spec is {what}; pass a tree like params with a QuantSpec or None "
        "per leaf, e.g. spec = blaq_jax.quant_spec(params, bits=1)")


def check_float_params(params, where: str) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(unwrap(params))[0]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"{where}: parameter {path_str(path)!r} has dtype {dtype}; only floating "
          "parameters can be trained (keep integer state out of params)")


def check_like_params(tree, params, what: str, where: str) -> None:
  """Raises a one-line ValueError if ``tree`` (``what``: "updates", "grads", ...)
  differs from ``params`` in structure or in a leaf's shape (a TypeError if a
  leaf has an integer or bool dtype), naming the path."""
  tree, params = unwrap(tree), unwrap(params)
  if is_params_placeholder(params):
    return
  t_flat, t_def = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_masked)
  p_flat, p_def = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_masked)
  if t_def != p_def:
    t_paths = {path_str(p) for p, _ in t_flat}
    p_paths = {path_str(p) for p, _ in p_flat}
    raise ValueError(
        f"{where}: {what} do not have the tree structure of params (paths only in "
        f"{what}: {sorted(t_paths - p_paths)[:5]}; only in params: "
        f"{sorted(p_paths - t_paths)[:5]}); pass a tree like params")
  for (path, t), (_, p) in zip(t_flat, p_flat):
    if is_masked(t) or is_masked(p):
      continue
    if jnp.shape(t) != jnp.shape(p):
      raise ValueError(
          f"{where}: {what} leaf {path_str(path)!r} has shape {jnp.shape(t)}, the "
          f"param has {jnp.shape(p)}; pass a tree like params")
    dtype = getattr(t, "dtype", None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
          f"{where}: {what} leaf {path_str(path)!r} has dtype {dtype}; gradients and "
          "updates must be floating (differentiate a float loss of float params)")


def check_state_scales(spec, params, scale, where: str) -> None:
  """Raises a one-line ValueError naming ``where`` and the path unless the
  state's ``scale`` tree belongs to ``spec`` and ``params``: an array of the
  leaf's scale shape (one per tensor, or per channel) at every quantized leaf.

  A state of another model, or of a spec with another ``per_channel``, fails
  here; one of another bit width has scales of the same shape (see
  :func:`blaq_jax.pack`, which also checks the values).
  """
  if is_params_placeholder(params):
    return
  spec, params, scale = unwrap(spec), unwrap(params), unwrap(scale)
  flat, treedef = jax.tree_util.tree_flatten_with_path(spec, is_leaf=is_spec_leaf)
  hint = ("pass the state of the optimizer built with this spec for these params "
          "(a checkpoint of another run or model does not fit)")
  try:
    ws = treedef.flatten_up_to(params)
    scales = treedef.flatten_up_to(scale)
  except (ValueError, TypeError):
    raise ValueError(f"{where}: the optimizer state's scales do not have the tree "
                     f"structure of the spec and params; {hint}") from None
  for (path, s), w, a in zip(flat, ws, scales):
    if not isinstance(s, QuantSpec) or w is None or is_masked(w) or is_masked(a):
      continue
    want = scale_shape(jnp.shape(w), s)
    if a is None or jnp.shape(a) != want:
      got = "no scale" if a is None else f"a scale of shape {jnp.shape(a)}"
      raise ValueError(f"{where}: the optimizer state has {got} for {path_str(path)!r}, "
                       f"its spec needs shape {want}; {hint}")


def check_grad_fn_result(result, params, where: str):
  """Checks what ``grad_fn(params)`` returned; returns it wrapped like ``params``.

  NNX Variables are unwrapped for the checks, and the result gets the
  Variables of ``params`` (none if ``params`` is a pure tree), so that it
  combines leafwise with the optimizer's moments.

  Raises a one-line error naming ``grad_fn`` and the path when it returned a
  ``(loss, grads)`` pair (``jax.value_and_grad``), a tree of another
  structure, a leaf of another shape, or a leaf that is not floating.
  """
  like = params
  result, params = unwrap(result), unwrap(params)
  p_def = jax.tree.structure(params, is_leaf=is_masked)
  r_def = jax.tree.structure(result, is_leaf=is_masked)
  if (isinstance(result, tuple) and len(result) == 2 and r_def != p_def
      and jax.tree.structure(result[1], is_leaf=is_masked) == p_def):
    raise ValueError(
        f"{where}: grad_fn returned a (loss, grads) pair; it must return the gradient "
        "only, a tree like params, e.g. grad_fn=lambda p: jax.grad(loss)(p, batch)")
  check_like_params(result, params, "grad_fn's gradients", where)
  return rewrap(like, result)


# --- mapping ----------------------------------------------------------------


def map_with_spec(fn: Callable[..., Any], spec, *trees):
  """``fn(spec_leaf, *subtrees)`` over the leaves of ``spec`` (None included).

  NNX Variables in ``spec`` and ``trees`` are unwrapped for ``fn``, and put
  back around the results where the first tree had them. Subtrees that are
  ``optax.MaskedNode`` (leaves masked out by ``optax.masked`` /
  ``optax.multi_transform``) and params leaves that are None pass through
  unchanged. If the first tree is optax's ``map_params``
  placeholder, it is returned as it is (the state field is "like params").
  """
  if trees and is_params_placeholder(trees[0]):
    return trees[0]
  spec = unwrap(spec)
  pure = tuple(unwrap(t) for t in trees)

  def leaf_fn(s, first, *rest):
    if first is None or is_masked(first):
      return first
    return fn(s, first, *rest)

  result = jax.tree.map(leaf_fn, spec, *pure, is_leaf=is_spec_leaf)
  if trees and pure[0] is not trees[0]:
    result = rewrap(trees[0], result)
  return result


def map_quantized(fn: Callable[..., Any], spec, *trees):
  """``fn(spec_leaf, *leaves)`` at the quantized leaves (spec not None), None
  at the others; the trees are unwrapped first, so the result is a pure tree
  (as an optimizer state is), whatever NNX Variables the inputs hold."""
  trees = tuple(unwrap(t) for t in trees)
  return map_with_spec(lambda s, *xs: None if s is None else fn(s, *xs), spec, *trees)


def unzip(tree, cls):
  """A tree whose leaves are ``cls`` NamedTuples -> one ``cls`` of trees.

  Per-leaf functions that compute several results return a ``cls``; this
  turns the tree of them into a tree per field (None and ``optax.MaskedNode``
  subtrees kept), so results are read back by name.
  """
  is_leaf = lambda x: isinstance(x, cls)
  return cls(*(jax.tree.map(lambda o, f=f: getattr(o, f), tree, is_leaf=is_leaf)
               for f in cls._fields))


def rewrap(like, result):
  """``result`` (a pure tree) with the NNX Variables of ``like`` put back
  around its non-None leaves, so that a transform given Variable-wrapped
  params returns trees of the same structure (None stays None)."""
  nnx = _nnx()
  if nnx is None:
    return result

  def put(v, r):
    if isinstance(v, nnx.Variable) and r is not None and not is_masked(r):
      return v.replace(r)
    return r

  return jax.tree.map(put, like, result, is_leaf=lambda x: is_variable(x) or x is None)


def map_none(fn: Callable[..., Any], tree, *rest):
  """``jax.tree.map`` that keeps None leaves of ``tree`` as None (and skips
  the matching subtrees of ``rest``), and passes ``optax.MaskedNode`` through."""

  def is_leaf(x):
    return x is None or is_masked(x)

  def leaf_fn(x, *ys):
    if x is None or is_masked(x):
      return x
    return fn(x, *ys)

  return jax.tree.map(leaf_fn, tree, *rest, is_leaf=is_leaf)


def find_states(opt_state, types) -> list:
  """The nodes of ``opt_state`` that are instances of ``types``, in tree order.

  Finds them inside ``optax.chain``, ``inject_hyperparams``, ``masked``,
  ``multi_transform``, an ``nnx.Optimizer``'s ``opt_state`` (Variables
  unwrapped) and any other nesting of states.
  """
  opt_state = unwrap(opt_state)
  is_state = lambda x: isinstance(x, types)
  return [s for s in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(s)]
