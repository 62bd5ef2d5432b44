"""Packed weights as a JAX value: bit-packed codes plus scales, unpacked under ``jit``.

A quantized leaf ``ŵ = α · b`` (``b`` in the code set ``C`` of its spec) is
held as a :class:`PackedArray`: the index of each ``b`` in the sorted
codebook of the spec, ``bits`` bits each, bit-packed into a flat ``uint8``
array of ``ceil(n · bits / 8)`` bytes (little-endian bit order, the layout of
the ``.npz`` export), and ``α`` (one per tensor, or one per output channel)
in the compute dtype (float32 for half-precision leaves). Shape, dtype and
spec are static: they live in the treedef, so a tree of packed arrays goes
through ``jit``, ``device_put``, sharding and orbax like any tree of arrays,
and holds on the device only its codes and scales.

:func:`dequantize` rebuilds ``ŵ`` with ``jnp`` ops that XLA fuses into the
consumer's computation: shifts and masks of the bytes (eight indices per
``bits`` bytes, static slices, no gather over the weights), a ``take`` on the
codebook (at most 256 entries) and the product with ``α``, which is the very
product :func:`blaq_jax.quantize_params` computes. A code ``-0.0`` (rounding
makes it) takes the spare index ``2^bits - 1`` of codebooks that hold 0, so
the result equals ``ŵ`` bit for bit, inside ``jit`` or not.

References:
  Hou, Yao & Kwok, `Loss-aware Binarization of Deep Networks
  <https://arxiv.org/abs/1611.01600>`_, ICLR 2017.
  Hou & Kwok, `Loss-aware Weight Quantization of Deep Networks
  <https://arxiv.org/abs/1802.08635>`_, ICLR 2018.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from blaq_jax._src import checks
from blaq_jax._src import spec as spec_lib
from blaq_jax._src import state_lookup as state_lib
from blaq_jax._src import tree as tree_lib
from blaq_jax._src.quantizers import (code_index, codes, compute_dtype, expand_scale,
                                      fit_scale, nearest_code, quantize_with_scale,
                                      scale_shape)
from blaq_jax._src.spec import QuantSpec, QuantSpecTree


@jax.tree_util.register_pytree_with_keys_class
class PackedArray:
  """A quantized array held as bit-packed code indices plus scales.

  ``ŵ = α · codebook[index]``, with ``index`` stored in ``spec.bits`` bits
  per weight. Children (arrays, on the device): ``codes``, a flat ``uint8``
  array of ``ceil(size · bits / 8)`` bytes, and ``scale``, ``α`` of shape
  ``(1,..,1)`` or ``(1,..,1, channels)`` in the compute dtype. Static
  (in the treedef): ``shape``, ``dtype`` (of ``ŵ``) and ``spec``.

  Build one with :func:`blaq_jax.pack_params` and turn it back into ``ŵ``
  with :func:`blaq_jax.dequantize` (inside ``jit``, so that only the packed
  bytes live on the device)::

    packed = bq.pack_params(params, spec, state=opt_state)
    w_hat = jax.jit(bq.dequantize_tree)(packed)   # == quantize_params(...), bit for bit

  Attributes:
    codes: the bit-packed code indices.
    scale: the scales ``α``.
    shape: the shape of ``ŵ``.
    dtype: the dtype of ``ŵ``.
    spec: the :class:`blaq_jax.QuantSpec` the codes belong to.
  """

  __slots__ = ("codes", "scale", "shape", "dtype", "spec")

  def __init__(self, codes, scale, shape, dtype, spec: QuantSpec):
    self.codes = codes
    self.scale = scale
    self.shape = tuple(int(n) for n in shape)
    self.dtype = jnp.dtype(dtype)
    self.spec = spec

  def tree_flatten_with_keys(self):
    keys = (jax.tree_util.GetAttrKey("codes"), jax.tree_util.GetAttrKey("scale"))
    return tuple(zip(keys, (self.codes, self.scale))), (self.shape, self.dtype, self.spec)

  def tree_flatten(self):
    return (self.codes, self.scale), (self.shape, self.dtype, self.spec)

  @classmethod
  def tree_unflatten(cls, aux, children):
    # Children may be tracers, shardings, ShapeDtypeStructs or None (jax and
    # orbax build such trees): no checks here.
    obj = object.__new__(cls)
    obj.codes, obj.scale = children
    obj.shape, obj.dtype, obj.spec = aux
    return obj

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes the packed value holds: its codes and its scales."""
    return _nbytes(self.codes) + _nbytes(self.scale)

  def __repr__(self):
    s = self.spec
    kind = f"{s.bits}-bit {s.scheme}{', per channel' if s.per_channel else ''}"
    return f"PackedArray(shape={self.shape}, dtype={self.dtype.name}, {kind})"


def _nbytes(x) -> int:
  if x is None:
    return 0
  return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


def is_packed(x) -> bool:
  return isinstance(x, PackedArray)


def code_bytes(size: int, bits: int) -> int:
  """Bytes of ``size`` indices of ``bits`` bits: ``ceil(size · bits / 8)``."""
  return -(-size * bits // 8)


@functools.cache
def codebook(spec: QuantSpec, dtype) -> np.ndarray:
  """The code values exactly as the quantizer computes them, sorted.

  ``nearest_code`` of the exact codes reproduces the quantizer's arithmetic
  (e.g. ``round(x n) / n`` may be evaluated as ``round(x n) · (1/n)``), so
  these are bit-identical to the ``b`` that :func:`codes` returns. Codebooks
  that hold 0 get ``-0.0`` at the spare index ``2^bits - 1``, so every index
  of ``bits`` bits has a code.
  """
  with jax.ensure_compile_time_eval():
    book = np.asarray(nearest_code(jnp.asarray(spec.codebook(), dtype), spec))
  book = book if spec.is_binary else np.append(book, np.asarray(-0.0, book.dtype))
  book.flags.writeable = False
  return book


# --- bit packing (jnp: traceable, fused by XLA) -----------------------------


def _pieces(bits: int):
  """For each of the 8 indices of a group of ``bits`` bytes: the byte it
  starts in, its bit offset there, and whether it runs into the next byte."""
  out = []
  for j in range(8):
    lo = j * bits
    out.append((lo // 8, lo % 8, lo % 8 + bits > 8))
  return out


@functools.partial(jax.jit, static_argnums=1)
def pack_indices(idx: jax.Array, bits: int) -> jax.Array:
  """Flat indices ``< 2^bits`` -> ``ceil(n · bits / 8)`` bytes (little-endian bits).

  Eight indices fill ``bits`` bytes; index ``j`` of a group occupies bits
  ``[j · bits, (j + 1) · bits)`` of it, its lowest bit first.
  """
  idx = jnp.asarray(idx, jnp.uint8).reshape(-1)
  n = idx.size
  groups = -(-n // 8)
  idx = jnp.pad(idx, (0, groups * 8 - n)).reshape(groups, 8).astype(jnp.uint16)
  out = []
  for k in range(bits):
    acc = jnp.zeros((groups,), jnp.uint16)
    for j in range(8):
      lo = j * bits - 8 * k
      if lo + bits <= 0 or lo >= 8:
        continue
      acc = acc | (idx[:, j] << lo if lo >= 0 else idx[:, j] >> -lo)
    out.append((acc & 0xFF).astype(jnp.uint8))
  return jnp.stack(out, axis=1).reshape(-1)[:code_bytes(n, bits)]


@functools.partial(jax.jit, static_argnums=(1, 2))
def unpack_indices(packed: jax.Array, bits: int, size: int) -> jax.Array:
  """The inverse of :func:`pack_indices`: ``size`` uint8 indices, by shifts
  and masks of static byte columns (no gather)."""
  packed = jnp.asarray(packed, jnp.uint8).reshape(-1)
  if bits == 8:
    return packed[:size]
  groups = -(-size // 8)
  cols = jnp.pad(packed, (0, groups * bits - packed.size)).reshape(groups, bits)
  mask = jnp.uint8((1 << bits) - 1)
  out = []
  for k, shift, spills in _pieces(bits):
    v = cols[:, k] >> jnp.uint8(shift)
    if spills:
      v = v | (cols[:, k + 1] << jnp.uint8(8 - shift))
    out.append(v & mask)
  return jnp.stack(out, axis=1).reshape(-1)[:size]


# --- packing and unpacking ----------------------------------------------------


def dequantize(packed: PackedArray) -> jax.Array:
  """Returns ``ŵ = α · codebook[index]`` of a :class:`PackedArray`, bit for bit.

  The indices are unpacked from the bytes with shifts and masks, looked up in
  the codebook of the spec (a ``take`` on at most 256 entries) and multiplied
  by ``α`` in the compute dtype, then cast to the leaf's dtype: the product
  :func:`blaq_jax.quantize_params` computes, so the result equals the ``ŵ``
  that was packed bit for bit, inside ``jit`` or not. Under ``jit`` XLA fuses
  the unpacking into the computation that consumes ``ŵ``.

  Under ``jit``, from a training state::

    packed = bq.pack_params(params, spec, state=opt_state)
    w_hat = jax.jit(bq.dequantize)(packed["dense"]["kernel"])

  References:
    Hou & Kwok, `Loss-aware Weight Quantization of Deep Networks
    <https://arxiv.org/abs/1802.08635>`_, ICLR 2018.

  Args:
    packed: a :class:`PackedArray`.

  Returns:
    ``ŵ`` of ``packed.shape`` and ``packed.dtype``.
  """
  if not isinstance(packed, PackedArray):
    raise TypeError(f"dequantize: expected a blaq_jax.PackedArray, got "
                    f"{type(packed).__name__}; use blaq_jax.dequantize_tree for a tree")
  return _dequantize(packed.codes, packed.scale, packed.shape, packed.dtype, packed.spec)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _dequantize(codes_, scale, shape, dtype, s):
  compute = compute_dtype(dtype)
  book = jnp.asarray(codebook(s, compute))
  idx = unpack_indices(codes_, s.bits, math.prod(shape)).astype(jnp.int32)
  b = jnp.take(book, idx, mode="clip").reshape(shape)
  alpha = expand_scale(jnp.asarray(scale).astype(compute), s, shape)
  return (alpha * b).astype(dtype)


def dequantize_tree(tree):
  """:func:`dequantize` at every :class:`PackedArray` of ``tree``; other
  leaves (biases, batch-norm statistics) are returned as they are.

  With Flax NNX, a model runs from its packed parameters in two lines; under
  ``nnx.jit`` the device holds the packed bytes and the unpacking is fused
  into the forward pass::

    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    logits = nnx.jit(lambda p, r, x: nnx.merge(graphdef, bq.dequantize_tree(p), r)(x))(
        packed, rest, x)

  Examples:
    >>> import jax.numpy as jnp
    >>> import blaq_jax as bq
    >>> params = {"w": jnp.array([[0.2, -0.6], [0.4, -0.8]]), "b": jnp.array([0.3, -0.1])}
    >>> tree = bq.pack_params(params, bq.quant_spec(params, bits=1))
    >>> print(bq.dequantize_tree(tree)["w"])
    [[ 0.5 -0.5]
     [ 0.5 -0.5]]

  Args:
    tree: any pytree (NNX Variables allowed) whose leaves are arrays or
      :class:`PackedArray` s, e.g. the result of :func:`blaq_jax.pack_params`.

  Returns:
    The tree with ``ŵ`` in place of every packed array.
  """
  pure = tree_lib.unwrap(tree)
  out = jax.tree.map(lambda x: dequantize(x) if isinstance(x, PackedArray) else x, pure,
                     is_leaf=is_packed)
  return out if pure is tree else tree_lib.rewrap(tree, out)


def pack_leaf(w, s: QuantSpec, alpha, name: str = "", where: str = "pack_params") -> PackedArray:
  """Packs ``w`` at scale ``alpha``: the codes of ``ŵ = α · code(w / α)``."""
  w = jnp.asarray(w)
  flat_b, idx, alpha = _leaf_codes(w, alpha, s)
  if not checks.is_traced(flat_b):
    book = codebook(s, flat_b.dtype)
    if not np.array_equal(book[np.asarray(idx)], np.asarray(flat_b)):
      raise ValueError(f"{where}: leaf {name!r} has values outside its codebook "
                       "(NaN or inf weights?); fix the weights or leave the leaf unquantized")
  return PackedArray(pack_indices(idx, s.bits), alpha, w.shape, w.dtype, s)


@functools.partial(jax.jit, static_argnums=2)
def _leaf_codes(w, alpha, s: QuantSpec):
  """The flat code values of ``w`` at ``alpha``, their codebook indices
  (``-0.0`` at the spare index) and ``alpha`` in the compute dtype. Jitted:
  called eagerly (export) it compiles once per shape and spec instead of
  dispatching each operation."""
  b = codes(w, s, alpha)
  flat_b = b.reshape(-1)
  n_codes = len(codebook(s, b.dtype)) - (0 if s.is_binary else 1)  # without -0.0
  idx = jnp.where((flat_b == 0) & jnp.signbit(flat_b), n_codes, code_index(flat_b, s))
  alpha = jnp.broadcast_to(jnp.asarray(alpha, b.dtype), scale_shape(w.shape, s))
  return flat_b, idx, alpha


# How much larger the projection error Σ D (w - ŵ)² at a state's scale may be
# than after one more warm-started projection from it (what the next training
# step would do) before the scale is taken to belong to another spec. Up to
# STATE_CHECK_MAX_BITS a state of this spec stays within a few percent and one
# of a neighbouring width is 25% or more off; from 5 bits on, the projection's
# local optima (many at 8 bits in a group of 16 weights) are as far apart as
# the widths, so there only the scale's shape and sign are checked.
STATE_ERROR_RATIO = 1.2
STATE_CHECK_MAX_BITS = 4


def spec_dict(s: QuantSpec) -> dict:
  return {k: (v.item() if isinstance(v, np.generic) else v)
          for k, v in dataclasses.asdict(s).items()}


def check_state_scale(where, name, w, s: QuantSpec, d, alpha) -> None:
  """Refuses a state scale that is not finite and positive, or (up to
  :data:`STATE_CHECK_MAX_BITS` bits) whose projection error is more than
  :data:`STATE_ERROR_RATIO` times that of ``s``'s warm-started fit from it."""
  if checks.is_traced(w, d, alpha):
    return   # traced: the values cannot be read
  if not (np.all(np.isfinite(np.asarray(alpha))) and np.all(np.asarray(alpha) > 0)):
    raise ValueError(f"{where}: the optimizer state's scale for {name!r} is not finite and "
                     "> 0; pass the state of the optimizer that trained these params")
  if s.bits > STATE_CHECK_MAX_BITS:
    return
  d = jnp.ones_like(w) if d is None else jnp.asarray(d, w.dtype)
  w64, d64 = np.asarray(w, np.float64), np.asarray(d, np.float64)

  def error(scale):
    return float(np.sum(d64 * (w64 - np.asarray(quantize_with_scale(w, s, scale),
                                                  np.float64)) ** 2))

  # One more training step's projection (warm-started at the state's scale)
  # barely improves a scale of this spec; it moves another spec's a long way.
  alpha = jnp.asarray(alpha)
  state_error, fit_error = error(alpha), error(fit_scale(w, s, d, alpha))
  if state_error > STATE_ERROR_RATIO * fit_error + 1e-9 * float(np.sum(d64 * w64 ** 2)):
    raise ValueError(
        f"{where}: the optimizer state's scale for {name!r} does not fit its spec "
        f"({spec_dict(s)}): its projection error is {state_error / max(fit_error, 1e-300):.3g}"
        f" times that of one more projection; the state belongs to another spec (bits, "
        "scheme) or other params, pass the state of the optimizer built with this spec")


def _pairs(params, spec, curvature, scale, where):
  """``(path, spec_leaf, param, curvature_leaf, scale_leaf)`` per param leaf,
  paired by path (None where no curvature or scale tree is given)."""
  spec, params = tree_lib.unwrap(spec), tree_lib.unwrap(params)
  none = jax.tree.map(lambda s: None, spec, is_leaf=spec_lib.is_spec_leaf)
  trees = (params, none if curvature is None else tree_lib.unwrap(curvature),
           none if scale is None else tree_lib.unwrap(scale))
  out = []

  def collect(path, s, w, d=None, a=None):
    if w is not None:
      out.append((path, s, w, d, a))

  try:
    jax.tree_util.tree_map_with_path(collect, spec, *trees, is_leaf=spec_lib.is_spec_leaf)
  except (ValueError, TypeError):
    raise ValueError(
        f"{where}: the curvature tree does not match params; pass "
        "blaq_jax.curvature(opt_state) of the optimizer that trained these params, "
        "or None") from None
  return out


def pack_params(params, spec: QuantSpecTree, curvature=None, *, state=None):
  """Packs a whole model: every quantized leaf becomes a :class:`PackedArray`.

  Per quantized leaf the same projection as :func:`blaq_jax.quantize_params`,

      ŵ = α · b,   b = code(w / α) ∈ C,

  held as ``index(b)`` in ``bits`` bits plus ``α``: ``ceil(n · bits / 8)``
  bytes of codes and one scale per tensor (or output channel), against ``4 n``
  bytes in float32. Leaves whose spec is None stay as they are.
  ``dequantize_tree(pack_params(params, spec, state=opt_state))`` equals
  ``quantize_params(params, spec, state=opt_state)`` bit for bit.

  Serving the packed model::

    packed = bq.pack_params(params, spec, state=opt_state)
    bq.save_packed("model.npz", packed, extra=batch_stats)   # optional
    logits = jax.jit(lambda p, x: forward(bq.dequantize_tree(p), x))(packed, x)

  Examples:
    >>> import jax.numpy as jnp
    >>> import blaq_jax as bq
    >>> params = {"w": jnp.array([[0.2, -0.6], [0.4, -0.8]]), "b": jnp.array([0.3, -0.1])}
    >>> tree = bq.pack_params(params, bq.quant_spec(params, bits=1))
    >>> tree["w"]
    PackedArray(shape=(2, 2), dtype=float32, 1-bit linear)
    >>> print(bq.dequantize(tree["w"]))
    [[ 0.5 -0.5]
     [ 0.5 -0.5]]

  References:
    Hou, Yao & Kwok, `Loss-aware Binarization of Deep Networks
    <https://arxiv.org/abs/1611.01600>`_, ICLR 2017.
    Hou & Kwok, `Loss-aware Weight Quantization of Deep Networks
    <https://arxiv.org/abs/1802.08635>`_, ICLR 2018.

  Args:
    params: the latent parameters (any pytree, e.g. a Flax NNX ``State``;
      NNX Variables are unwrapped, None leaves skipped).
    spec: the tree from :func:`blaq_jax.quant_spec`.
    curvature: a ``D`` tree for a cold-started projection, or None for
      ``D = 1``; ignored when ``state`` is given.
    state: the LAQ/BLAQ optimizer state (alone or inside a chain): its stored
      scales are used, so the packed model is exactly ``quantize_params(params,
      spec, state=state)``. A state of another spec (bits, scheme) or model is
      refused with a one-line error naming the leaf.

  Returns:
    A pure tree like ``params`` (Variables unwrapped) with a
    :class:`PackedArray` at every quantized leaf.
  """
  return pack_tree(params, spec, curvature, state, "pack_params")


def pack_tree(params, spec, curvature, state, where: str):
  """:func:`pack_params`, with ``where`` naming the caller in error messages."""
  spec_lib.check_spec_matches(spec, params, where)
  scale = state_curv = None
  if state is not None:
    curvature, scale = None, state_lib.find_scales(state, spec, params, where)
    state_curv = state_lib.find_field(state, "curvature", where)
  curv_by_path = ({} if state_curv is None else
                  {tree_lib.path_str(p): d for p, _, _, d, _ in
                   _pairs(params, spec, state_curv, None, where)})
  packed = {}
  for path, s, w, d, a in _pairs(params, spec, curvature, scale, where):
    name = tree_lib.path_str(path)
    if s is None:
      packed[name] = w
      continue
    w = jnp.asarray(w)
    if a is not None:
      check_state_scale(where, name, w, s, curv_by_path.get(name), a)
      alpha = jnp.asarray(a)
    else:
      alpha = fit_scale(w, s, d)
    packed[name] = pack_leaf(w, s, alpha, name, where)
  pure = tree_lib.unwrap(params)
  return jax.tree_util.tree_map_with_path(
      lambda p, w: None if w is None else packed[tree_lib.path_str(p)], pure)
