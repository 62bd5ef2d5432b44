"""Pytree helpers shared by the transforms: paths, spec mapping, validation."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from blaq_jax._src.quantizers import QuantSpec


def path_str(path) -> str:
  """``('layers', 0, 'kernel')``-style key path as ``"layers/0/kernel"``."""
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


def _leaf_paths(tree, is_leaf=None) -> list[str]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [path_str(p) for p, _ in leaves]


def check_spec_matches(spec, params, where: str) -> None:
  """Raises ValueError naming the paths where ``spec`` and ``params`` differ."""
  try:
    jax.tree.map(lambda s, p: None, spec, params, is_leaf=is_spec_leaf)
  except (ValueError, TypeError) as e:
    spec_paths = set(_leaf_paths(spec, is_spec_leaf))
    param_paths = set(_leaf_paths(params))
    only_p = sorted(param_paths - spec_paths)[:5]
    only_s = sorted(spec_paths - param_paths)[:5]
    raise ValueError(
        f"{where}: the spec tree does not match the params tree "
        f"(paths only in params: {only_p}; only in spec: {only_s}). "
        f"Build it with blaq_jax.quant_spec(params, ...). [{e}]") from None
  bad = [
      path_str(p) for p, s in
      jax.tree_util.tree_flatten_with_path(spec, is_leaf=is_spec_leaf)[0]
      if not is_spec_leaf(s)
  ]
  if bad:
    raise TypeError(f"{where}: spec leaves must be QuantSpec or None; bad at {bad[:5]}")


def check_float_params(params, where: str) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"{where}: parameter {path_str(path)!r} has dtype {dtype}; only floating "
          "parameters can be trained (keep integer state out of params)")


def map_with_spec(fn: Callable[..., Any], spec, *trees):
  """``fn(spec_leaf, *subtrees)`` over the leaves of ``spec`` (None included).

  Subtrees that are ``optax.MaskedNode`` (leaves masked out by
  ``optax.masked`` / ``optax.multi_transform``) are passed through unchanged.
  """

  def leaf_fn(s, first, *rest):
    if is_masked(first):
      return first
    return fn(s, first, *rest)

  return jax.tree.map(leaf_fn, spec, *trees, is_leaf=is_spec_leaf)


def find_states(opt_state, types) -> list:
  """The nodes of ``opt_state`` that are instances of ``types``, in tree order.

  Finds them inside ``optax.chain``, ``inject_hyperparams``, ``masked``,
  ``multi_transform`` and any other nesting of states.
  """
  is_state = lambda x: isinstance(x, types)
  return [s for s in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(s)]
