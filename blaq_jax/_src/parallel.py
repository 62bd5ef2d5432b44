"""Data-parallel training steps: ``pmap`` or ``jit`` over a device ``Mesh``.

A step written for one device, ``step(params, opt_state, ..., batch)``, becomes
data-parallel in one of two modes, chosen once::

    dp = bq.data_parallel("jit")             # or "pmap"
    tx = bq.blaq(lr, spec, batch_axis_name=dp.axis_name)

    def step(params, opt_state, x, y):
      q = bq.quantize_params(params, spec, state=opt_state)
      loss, g = jax.value_and_grad(loss_fn)(q, x, y)
      g = dp.pmean(g)                          # pmap: pmean; jit: identity
      updates, opt_state = tx.update(
          g, opt_state, params, grad_fn=lambda p: jax.grad(loss_fn)(p, x, y))
      return optax.apply_updates(params, updates), opt_state, dp.pmean(loss)

    step = dp.parallelize(step, batch_argnums=(2, 3))
    params, opt_state = dp.replicate((params, opt_state))
    params, opt_state, loss = step(params, opt_state, *dp.shard_batch((x, y)))

``"pmap"``: each device runs the step on its slice of the batch; the arrays
carry a leading device axis; gradients are averaged with ``jax.lax.pmean``
over ``axis_name`` (``dp.pmean`` for ``g_t``, ``blaq(batch_axis_name=...)``
for the lookahead gradient ``g*``). ``"jit"``: the step sees the global batch,
sharded over the ``data`` axis of a :class:`jax.sharding.Mesh`; params and
optimizer state are replicated, a mean over the batch is already global, and
XLA inserts the all-reduce (``dp.axis_name`` is None, ``dp.pmean`` and
``dp.psum`` the identity). Both run multi-host after ``jax.distributed.initialize()``: each
process passes its own slice of the global batch to ``shard_batch``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from blaq_jax._src import checks
from blaq_jax._src import tree as tree_lib

_MODES = ("pmap", "jit")


class DataParallel(NamedTuple):
  """What :func:`data_parallel` returns: the mode and its placement functions.

  Attributes:
    mode: ``"pmap"`` or ``"jit"``.
    axis_name: the ``pmap`` axis (pass it to ``blaq(batch_axis_name=...)`` and
      ``nnx.BatchNorm(axis_name=...)``); None under ``"jit"``.
    mesh: the 1-D device mesh under ``"jit"``; None under ``"pmap"``.
    parallelize: ``parallelize(step_fn, *, batch_argnums, donate_argnums=())``
      returns the compiled data-parallel step. Positional arguments in
      ``batch_argnums`` are batches (split on their leading axis), the others
      replicated state. Under ``"pmap"`` every output has a leading device
      axis; under ``"jit"`` every output is replicated.
    replicate: places a pytree (e.g. params, ``tx.init(params)``, a restored
      checkpoint) on every device, as ``parallelize`` expects it.
    shard_batch: splits this process's batch (leading axis) over its devices.
    unreplicate: the inverse of ``replicate``: one copy, on one local device.
    pmean: inside the step, ``jax.lax.pmean`` over ``axis_name`` under
      ``"pmap"``; the identity under ``"jit"`` (a mean over the batch is
      already global there).
    psum: likewise ``jax.lax.psum`` (e.g. for counts in an eval step).
  """

  mode: str
  axis_name: str | None
  mesh: Mesh | None
  parallelize: Callable[..., Callable]
  replicate: Callable[[Any], Any]
  shard_batch: Callable[[Any], Any]
  unreplicate: Callable[[Any], Any]
  pmean: Callable[[Any], Any]
  psum: Callable[[Any], Any]


def _argnums(name: str, value: int | Sequence[int]) -> tuple[int, ...]:
  nums = tuple(value) if isinstance(value, Sequence) else (value,)
  if not all(checks.is_concrete_number(i, integer=True) and i >= 0 for i in nums):
    raise TypeError(f"data_parallel: {name} must be non-negative ints, got {value!r}")
  return tuple(int(i) for i in nums)


def _check_divisible(tree, n: int, what: str) -> None:
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = np.shape(x)
    if not shape or shape[0] % n:
      raise ValueError(
          f"shard_batch: leaf {tree_lib.path_str(path) or '<root>'!r} has shape "
          f"{shape}; its leading (batch) axis must be divisible by the {n} {what}")


def data_parallel(
    mode: str = "jit",
    *,
    axis_name: str = "batch",
    mesh: Mesh | None = None,
    data_axis: str = "data",
) -> DataParallel:
  """Returns the functions that make a single-device step data-parallel.

  With ``K`` devices (or processes) each holding a slice ``B_k`` of the global
  batch ``B``, both modes take the single-device step on ``B``::

      g = (1/K) Σ_k ∇ℓ(ŵ; B_k) = ∇ℓ(ŵ; B)       (equal slices)

  ``"pmap"`` writes the mean (``dp.pmean``, and BLAQ's ``batch_axis_name`` for
  ``g*``); ``"jit"`` shards ``B`` over a mesh and XLA inserts it.

  References:
    JAX documentation, `Distributed arrays and automatic parallelization
    <https://docs.jax.dev/en/latest/parallel.html>`_ and ``jax.pmap``;
    ``optax.contrib.sam`` (``batch_axis_name``).

  Args:
    mode: ``"pmap"`` (``jax.pmap`` over this process's devices, state with a
      leading device axis, gradients ``pmean``-ed over ``axis_name``) or
      ``"jit"`` (``jax.jit`` over a mesh, batch sharded on ``data_axis``,
      state replicated, no collective written by hand). Prefer ``"jit"``: it
      runs the single-device step as it is, and a mesh with more axes can
      shard the model later; ``"pmap"`` suits existing pmap code and needs the
      ``dp.pmean`` calls in the step (they are no-ops under ``"jit"``, so one
      step serves both).
    axis_name: the ``pmap`` axis name (``"pmap"`` only).
    mesh: the mesh for ``"jit"``; default: all devices (of all processes) on
      one ``data_axis`` axis.
    data_axis: the mesh axis the batch is sharded over (``"jit"`` only).

  Returns:
    A :class:`DataParallel`.

  Raises:
    ValueError: for an unknown ``mode`` or a ``mesh`` without ``data_axis``.
  """
  if mode not in _MODES:
    raise ValueError(f"data_parallel: mode must be one of {_MODES}, got {mode!r}")
  if mode == "pmap":
    return _pmap_mode(axis_name)
  if mesh is None:
    mesh = jax.make_mesh((jax.device_count(),), (data_axis,),
                         axis_types=(jax.sharding.AxisType.Auto,))
  elif not isinstance(mesh, Mesh):
    raise TypeError(f"data_parallel: mesh must be a jax.sharding.Mesh, got {type(mesh)}")
  if data_axis not in mesh.axis_names:
    raise ValueError(
        f"data_parallel: data_axis {data_axis!r} is not an axis of the mesh "
        f"{mesh.axis_names}")
  return _jit_mode(mesh, data_axis)


def _pmap_mode(axis_name: str) -> DataParallel:
  devices = jax.local_devices()
  n = len(devices)
  # Arrays laid out as pmap lays out its own outputs: axis 0 over the devices.
  stacked = NamedSharding(Mesh(np.array(devices), (axis_name,)), P(axis_name))

  def parallelize(step_fn, *, batch_argnums, donate_argnums=()):
    _argnums("batch_argnums", batch_argnums)
    return jax.pmap(step_fn, axis_name=axis_name, in_axes=0, out_axes=0,
                    donate_argnums=_argnums("donate_argnums", donate_argnums))

  def replicate(tree):
    def put(x):
      x = jax.numpy.asarray(x)
      shards = [jax.device_put(x[None], d) for d in devices]
      return jax.make_array_from_single_device_arrays((n,) + x.shape, stacked, shards)
    return jax.tree.map(put, tree)

  def shard_batch(tree):
    _check_divisible(tree, n, "local devices")
    return jax.tree.map(
        lambda x: jax.device_put(np.reshape(x, (n, -1) + np.shape(x)[1:])
                                 if isinstance(x, np.ndarray) else
                                 x.reshape((n, -1) + x.shape[1:]), stacked), tree)

  def unreplicate(tree):
    return jax.tree.map(lambda x: x[0], tree)

  def pmean(tree):
    return jax.lax.pmean(tree, axis_name)

  def psum(tree):
    return jax.lax.psum(tree, axis_name)

  return DataParallel("pmap", axis_name, None, parallelize, replicate,
                      shard_batch, unreplicate, pmean, psum)


def _jit_mode(mesh: Mesh, data_axis: str) -> DataParallel:
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(data_axis))
  n_local = len({d for d in mesh.devices.flat if d.process_index == jax.process_index()})

  def parallelize(step_fn, *, batch_argnums, donate_argnums=()):
    batch = set(_argnums("batch_argnums", batch_argnums))
    donate = _argnums("donate_argnums", donate_argnums)
    n_args = max(batch | set(donate), default=-1) + 1

    def in_shardings(num_args):
      return tuple(batch_sharding if i in batch else replicated for i in range(num_args))

    compiled = {}

    def wrapped(*args):
      if len(args) < n_args:
        raise TypeError(f"parallelize: the step takes at least {n_args} positional "
                        f"arguments here, got {len(args)}")
      if len(args) not in compiled:
        compiled[len(args)] = jax.jit(step_fn, in_shardings=in_shardings(len(args)),
                                      out_shardings=replicated, donate_argnums=donate)
      return compiled[len(args)](*args)

    return wrapped

  def put(tree, sharding):
    if jax.process_count() == 1:
      return jax.device_put(tree, sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)

  def replicate(tree):
    return put(tree, replicated)

  def shard_batch(tree):
    _check_divisible(tree, n_local, "local devices of the mesh")
    if jax.process_count() == 1:
      return jax.device_put(tree, batch_sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding, x), tree)

  def unreplicate(tree):
    def one(x):
      if isinstance(x, jax.Array) and x.sharding.is_fully_replicated:
        return x.addressable_data(0)
      return x
    return jax.tree.map(one, tree)

  def identity(tree):
    return tree

  return DataParallel("jit", None, mesh, parallelize, replicate, shard_batch,
                      unreplicate, identity, identity)
