"""Fully sharded (FSDP) training: an optimizer state laid out like the params.

With ``jax.jit`` and :class:`jax.sharding.NamedSharding`, JAX's SPMD
partitioner runs a step written for one device on params, optimizer state and
batch that are split over a device mesh; every sum (a loss, a scale's
``Σ D b w``, a gradient's batch mean) is reduced across the shards by the
collectives XLA inserts. What the step needs is a sharding for every array
it carries. :func:`shard_like` derives the optimizer state's from the
params': the moments (and BLAQ's ``D``, the trackers' per-weight statistics)
take their param's sharding, a scale its param's sharding on each axis the
scale's size still divides (group-wise scales ``(in // g, out)`` stay split
along ``in``; per-tensor and per-channel scales and counters are replicated).
"""

from __future__ import annotations

import math

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from blaq_jax._src import tree as tree_lib


def _is_empty(x) -> bool:
  return x is None or isinstance(x, optax.MaskedNode)


def _axis_size(mesh, entry) -> int:
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[n] for n in names)


def _fit(sharding: NamedSharding, shape) -> NamedSharding:
  """``sharding``'s spec on every axis of ``shape`` that its mesh axes divide,
  replicated on the others (and on axes the spec does not reach)."""
  spec = tuple(sharding.spec) + (None,) * max(len(shape) - len(sharding.spec), 0)
  kept = tuple(e if shape[i] % _axis_size(sharding.mesh, e) == 0 else None
               for i, e in enumerate(spec[:len(shape)]))
  while kept and kept[-1] is None:
    kept = kept[:-1]
  return NamedSharding(sharding.mesh, P(*kept))


def shard_like(tree, params_sharding):
  """Shardings for ``tree`` (e.g. an optimizer state) from the params' shardings.

  Every subtree of ``tree`` with the params' tree structure (None leaves
  included: the ``scale`` and ``curvature`` trees of :func:`blaq_jax.laq` /
  :func:`blaq_jax.blaq` are None at leaves that are not quantized) is laid
  out leaf by leaf like the params: a leaf gets its param's
  ``PartitionSpec`` on every axis whose size the spec's mesh axes divide, and
  is replicated on the others. So for a param sharded ``P("fsdp", None)``::

      mu, nu, D, codes   (in, out)        P("fsdp", None)    as the param
      group scale        (in // g, out)   P("fsdp", None)    if the mesh divides in // g
      channel scale      (1, out)         P()                replicated
      count, b2, eps     ()               P()                replicated

  Leaves outside such subtrees (step counts, hyperparameters) are
  replicated; None and ``optax.MaskedNode`` leaves stay as they are. Leaves
  of the same shape get the same sharding, so in a jitted step the moments,
  the scales' sums and the update of a weight stay on the device that holds
  the weight; the partitioner reduces what spans devices.

  Example (FSDP: params and state split over ``"fsdp"``, the batch too)::

    mesh = jax.make_mesh((jax.device_count(),), ("fsdp",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    params_sharding = jax.tree.map(
        lambda x: NamedSharding(mesh, P("fsdp") if x.shape[0] % mesh.size == 0 else P()),
        params)
    params = jax.device_put(params, params_sharding)
    state_sharding = bq.shard_like(jax.eval_shape(tx.init, params), params_sharding)
    opt_state = jax.jit(tx.init, out_shardings=state_sharding)(params)
    step = jax.jit(train_step, out_shardings=(params_sharding, state_sharding, None))

  References:
    JAX documentation, `Distributed arrays and automatic parallelization
    <https://docs.jax.dev/en/latest/parallel.html>`_; Zhao et al., `PyTorch FSDP:
    Experiences on Scaling Fully Sharded Data Parallel
    <https://arxiv.org/abs/2304.11277>`_, VLDB 2023.

  Args:
    tree: a pytree of arrays or ``jax.ShapeDtypeStruct`` s, e.g.
      ``jax.eval_shape(tx.init, params)`` or a state itself.
    params_sharding: a tree like the params with a
      :class:`jax.sharding.NamedSharding` (or None) per leaf.

  Returns:
    A tree like ``tree`` with a ``NamedSharding`` per array leaf, for
    ``jax.device_put`` or ``jax.jit(..., out_shardings=...)``.

  Raises:
    TypeError: a ``params_sharding`` leaf that is not a ``NamedSharding``, or
      a tree without any.
  """
  params_sharding = tree_lib.unwrap(params_sharding)
  tree = tree_lib.unwrap(tree)
  flat = jax.tree_util.tree_flatten_with_path(params_sharding, is_leaf=_is_empty)[0]
  mesh = None
  for path, s in flat:
    if _is_empty(s):
      continue
    if not isinstance(s, NamedSharding):
      raise TypeError(
          f"shard_like: params_sharding at {tree_lib.path_str(path) or '<root>'!r} is "
          f"{type(s).__name__}; pass a tree like params with a jax.sharding.NamedSharding "
          "(or None) per leaf")
    mesh = mesh or s.mesh
  if mesh is None:
    raise TypeError("shard_like: params_sharding holds no jax.sharding.NamedSharding; pass a "
                    "tree like params with a NamedSharding per leaf")
  replicated = NamedSharding(mesh, P())
  p_def = jax.tree.structure(params_sharding, is_leaf=_is_empty)

  def like_params(x):
    return jax.tree.structure(x, is_leaf=_is_empty) == p_def

  def place(x):
    if _is_empty(x):
      return x
    if like_params(x):
      return jax.tree.map(
          lambda v, s: v if _is_empty(v) else (
              replicated if _is_empty(s) else _fit(s, tuple(getattr(v, "shape", ())))),
          x, params_sharding, is_leaf=_is_empty)
    return replicated

  return jax.tree.map(place, tree, is_leaf=lambda x: _is_empty(x) or like_params(x))
