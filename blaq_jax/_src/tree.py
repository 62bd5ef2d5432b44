"""Pytree helpers shared by the transforms: paths, NNX Variables, masks, checks.

Every helper here accepts the trees a Flax NNX user holds as they are: an
``nnx.State`` whose leaves are ``nnx.Variable`` s (``nnx.state(model,
nnx.Param)``), the pure ``State`` that ``nnx.Optimizer`` passes to ``update``,
and optax's placeholder of :func:`optax.tree.map_params`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


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


def is_abstract(x) -> bool:
  """A ``jax.ShapeDtypeStruct`` leaf (params described by shape and dtype only)."""
  return isinstance(x, jax.ShapeDtypeStruct)


def leaf_paths(tree, is_leaf=None) -> list[str]:
  """The :func:`path_str` of every leaf of ``tree``, in tree order."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [path_str(p) for p, _ in leaves]


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
