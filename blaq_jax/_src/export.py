"""Deployment export: the ``.npz`` serialisation of a packed model, and its size.

The value is the tree of :func:`blaq_jax.pack_params`: a
:class:`blaq_jax.PackedArray` per quantized leaf (``ŵ = α · b``, ``b`` in the
code set of its spec, stored as ``index(b)`` in ``bits`` bits plus ``α``) and
the unquantized leaves as they are. :func:`save_packed` writes it to one
``.npz`` file, atomically, optionally with the model's non-parameter state
(``extra=``: batch-norm running statistics and the like), so that the file
holds everything the forward pass needs; :func:`load_packed_model` reads it
back as the same value, every leaf checked first; :func:`unpack` reads it
back as ``ŵ`` in float, bit for bit the ``ŵ`` that was packed.

File layout (``np.savez``): per parameter leaf ``"<path>::codes"`` (uint8,
``ceil(n · bits / 8)`` bytes, little-endian bit order) and ``"<path>::alpha"``
(the scales), or ``"<path>::value"``; per leaf of the extra state
``"extra:<path>::value"``; and ``"__meta__"``, JSON: per leaf its path,
shape, dtype, spec (None for a stored value), ``"extra": true`` for the
extra state, and a sha256 of all of these and of its arrays, which every
reader checks. :func:`pack` returns this dict without writing it.

Packed size per quantized leaf: ``ceil(n · bits / 8)`` bytes of codes plus
4 bytes per scale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import zipfile
import zlib
from pathlib import Path
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from blaq_jax._src import tree as tree_lib
from blaq_jax._src.packed import (PackedArray, code_bytes, codebook, dequantize, is_packed,
                                  pack_tree, spec_dict)
from blaq_jax._src.quantizers import compute_dtype, scale_shape
from blaq_jax._src.spec import QuantSpec, QuantSpecTree

_META = "__meta__"
_EXTRA = "extra:"


def _pack_indices(idx: np.ndarray, bits: int) -> np.ndarray:
  """uint8 indices < 2^bits -> bytes, ``bits`` bits each (little-endian bit order)."""
  planes = np.unpackbits(idx.reshape(-1, 1).astype(np.uint8), axis=1, bitorder="little")
  return np.packbits(planes[:, :bits].reshape(-1), bitorder="little")


def _unpack_indices(packed: np.ndarray, bits: int, size: int) -> np.ndarray:
  flat = np.unpackbits(packed, count=size * bits, bitorder="little").reshape(size, bits)
  weights = (1 << np.arange(bits)).astype(np.uint16)
  return (flat.astype(np.uint16) @ weights).astype(np.uint8)


def _codebook(s: QuantSpec, dtype) -> np.ndarray:
  return codebook(s, jnp.dtype(dtype))


def _spec_from(d: dict) -> QuantSpec:
  """A QuantSpec from its saved fields (fields this version lacks are dropped)."""
  names = {f.name for f in dataclasses.fields(QuantSpec)}
  return QuantSpec(**{k: v for k, v in d.items() if k in names})


def _digest(entry: dict, arrays) -> str:
  """sha256 of the entry's description and its arrays (detects edits and truncation)."""
  h = hashlib.sha256()
  desc = {k: entry[k] for k in ("path", "shape", "dtype", "spec")}
  if entry.get("extra"):
    desc["extra"] = True
  h.update(json.dumps(desc, sort_keys=True).encode())
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _key(entry: dict, suffix: str) -> str:
  return f"{_EXTRA if entry.get('extra') else ''}{entry['path']}::{suffix}"


# --- writing --------------------------------------------------------------------


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _flat_leaves(tree, what: str, source: str):
  """``[(path, leaf)]`` of a packed tree (PackedArray or array leaves)."""
  flat = jax.tree_util.tree_flatten_with_path(tree_lib.unwrap(tree), is_leaf=is_packed)[0]
  out = []
  for path, leaf in flat:
    name = tree_lib.path_str(path)
    if not (is_packed(leaf) or _is_array(leaf)):
      raise ValueError(
          f"{source}: {what} must be the dict blaq_jax.pack returns or a tree of arrays and "
          f"blaq_jax.PackedArray (blaq_jax.pack_params); leaf {name!r} is a "
          f"{type(leaf).__name__}")
    if _is_array(leaf) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      raise ValueError(f"{source}: {what} leaf {name!r} is a PRNG key; store "
                       "jax.random.key_data(key) instead, or leave the RNG state out")
    out.append((name, leaf))
  return out


def _entries(tree, *, extra: bool, what: str, source: str) -> tuple[dict, list[dict]]:
  """The flat dict of one tree's arrays, and its ``__meta__`` entries."""
  out: dict[str, np.ndarray] = {}
  meta: list[dict] = []
  for name, leaf in _flat_leaves(tree, what, source):
    if is_packed(leaf):
      entry: dict[str, Any] = {"path": name, "shape": list(leaf.shape),
                               "dtype": leaf.dtype.name, "spec": spec_dict(leaf.spec)}
      arrays = {"codes": np.asarray(leaf.codes, np.uint8), "alpha": np.asarray(leaf.scale)}
    else:
      value = np.asarray(leaf)
      entry = {"path": name, "shape": list(value.shape), "dtype": str(value.dtype),
               "spec": None}
      arrays = {"value": value}
    if extra:
      entry["extra"] = True
    for suffix, a in arrays.items():
      out[_key(entry, suffix)] = a
    entry["sha256"] = _digest(entry, list(arrays.values()))
    meta.append(entry)
  return out, meta


def serialise(packed, extra=None, source: str = "save_packed") -> dict:
  """The ``.npz`` dict of a packed tree (and its extra state)."""
  out, meta = {}, []
  if isinstance(packed, dict) and _META in packed:
    out.update({k: v for k, v in packed.items() if k != _META})
    meta += _meta(packed, source)
  else:
    arrays, entries = _entries(packed, extra=False, what="packed", source=source)
    out.update(arrays)
    meta += entries
  if extra is not None:
    if any(isinstance(e, dict) and e.get("extra") for e in meta):
      raise ValueError(f"{source}: packed already holds an extra state; pass it once")
    arrays, entries = _entries(extra, extra=True, what="extra", source=source)
    out.update(arrays)
    meta += entries
  out[_META] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  return out


def pack(params, spec: QuantSpecTree, curvature=None, *, state=None) -> dict:
  """Packs the quantized leaves of ``params`` into bit codes plus scales, as a dict.

  The ``.npz`` serialisation of :func:`blaq_jax.pack_params`'s tree (which
  holds the same codes as JAX arrays, ready for ``jit``): per quantized leaf
  ``ŵ = α · b`` with ``b ∈ C`` (the code set of its spec), stored as
  ``index(b)`` in the sorted codebook, ``bits`` bits each, plus ``α``;
  ``ceil(n · bits / 8) + 4 · (number of scales)`` bytes against ``4 n`` in
  float32.

  After training, with the scales of the optimizer state::

    bq.save_packed("model.npz", bq.pack(params, spec, state=opt_state))

  Examples:
    >>> import jax.numpy as jnp
    >>> import blaq_jax as bq
    >>> params = {"w": jnp.array([[0.2, -0.6], [0.4, -0.8]]), "b": jnp.array([0.3, -0.1])}
    >>> spec = bq.quant_spec(params, bits=1)
    >>> packed = bq.pack(params, spec)
    >>> sorted(packed)
    ['__meta__', 'b::value', 'w::alpha', 'w::codes']
    >>> print(bq.unpack(packed, like=params)["w"])
    [[ 0.5 -0.5]
     [ 0.5 -0.5]]

  References:
    Hou, Yao & Kwok, `Loss-aware Binarization of Deep Networks
    <https://arxiv.org/abs/1611.01600>`_, ICLR 2017.
    Hou & Kwok, `Loss-aware Weight Quantization of Deep Networks
    <https://arxiv.org/abs/1802.08635>`_, ICLR 2018.

  Args:
    params: the latent parameters (any pytree, e.g. a Flax NNX ``State``;
      None leaves are skipped, NNX Variables unwrapped).
    spec: the tree from :func:`blaq_jax.quant_spec` (None leaves are kept in
      full precision).
    curvature: a ``D`` tree for a cold-started projection, or None for
      ``D = 1``; ignored when ``state`` is given.
    state: the LAQ/BLAQ optimizer state (alone or inside a chain): its
      stored scales are used, so the packed model is exactly
      ``quantize_params(params, spec, state=state)``; a state of another spec
      or model is refused with a one-line error naming the leaf.

  Returns:
    A flat dict of numpy arrays (ready for :func:`save_packed` /
    ``np.savez``): per leaf ``"<path>::codes"`` and ``"<path>::alpha"`` or
    ``"<path>::value"``, and a JSON ``"__meta__"`` entry with shapes, dtypes,
    specs and a sha256 per leaf that every reader checks.
  """
  return serialise(pack_tree(params, spec, curvature, state, "pack"), source="pack")


def save_packed(path, packed, *, extra=None) -> None:
  """Writes a packed model to one ``.npz`` file, atomically.

  The archive is written to a temporary file next to ``path`` and then
  renamed over it (``os.replace``), so an interrupted write leaves either the
  old file or the new one, never a truncated archive.

  Example (Flax NNX; the file then holds all the forward pass needs)::

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    bq.save_packed("model.npz", bq.pack_params(params, spec, state=opt_state), extra=rest)

  Args:
    path: the ``.npz`` file to write.
    packed: the tree of :func:`blaq_jax.pack_params` (or the dict of
      :func:`pack`).
    extra: optional tree of the model's non-parameter state (batch-norm
      running statistics, counters: any numeric arrays), read back by
      :func:`load_packed_model`'s ``extra_like``.
  """
  path = Path(path)
  source = f"save_packed: {str(path)!r}"
  if isinstance(packed, dict) and _META not in packed and not jax.tree.leaves(packed):
    raise ValueError(f"{source}: packed must be the dict blaq_jax.pack returns or the tree "
                     "of blaq_jax.pack_params; it is empty")
  flat = serialise(packed, extra, source)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **flat)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


# --- reading --------------------------------------------------------------------


def load_packed(path) -> dict:
  """Reads a file written by :func:`save_packed` into the dict :func:`pack` returns.

  Args:
    path: the ``.npz`` file.

  Returns:
    ``{name: numpy array}``, to pass to :func:`unpack` or :func:`size_report`
    (both also take the path directly). Nothing is checked here;
    :func:`unpack` and :func:`load_packed_model` check every leaf.

  Raises:
    ValueError: the file is not an ``.npz`` archive, or is truncated (names
      the file).
  """
  try:
    # The file is opened here, so that it is closed even when np.load fails.
    with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
      if not hasattr(z, "files"):
        raise ValueError("not an .npz archive")
      return {k: z[k] for k in z.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise ValueError(f"load_packed: {str(path)!r} is not a packed model written by "
                     f"blaq_jax.save_packed ({' '.join(str(e).split())[:120]})") from None


def _meta(packed, source: str = "unpack") -> list[dict]:
  if _META not in packed:
    raise ValueError(f"{source}: not a packed model (no '__meta__' entry); write it with "
                     "blaq_jax.pack / save_packed")
  try:
    meta = json.loads(bytes(np.asarray(packed[_META], np.uint8)).decode())
  except ValueError as e:  # also a UnicodeDecodeError
    raise ValueError(f"{source}: the '__meta__' entry is not valid JSON ({e}); the file "
                     "is corrupted, export it again with blaq_jax.pack") from None
  if not isinstance(meta, list):
    raise ValueError(f"{source}: the '__meta__' entry is not a list of leaves; the file "
                     "is corrupted, export it again with blaq_jax.pack")
  return meta


def _corrupt(source, name, what):
  return ValueError(f"{source}: leaf {name!r}: {what}; the packed data is corrupted or "
                    "was edited, export it again with blaq_jax.pack")


def _load_entry(packed, entry, source):
  """Checks one leaf's entry and arrays; returns ``(name, is_extra, leaf)`` with
  a :class:`PackedArray` (numpy children) or a numpy array as ``leaf``."""
  name = entry.get("path", "?") if isinstance(entry, dict) else "?"
  if not isinstance(entry, dict) or not {"path", "shape", "dtype", "spec"} <= set(entry):
    raise _corrupt(source, name, "its '__meta__' entry lacks path/shape/dtype/spec")
  extra = bool(entry.get("extra", False))
  try:
    shape = tuple(int(n) for n in entry["shape"])
    dtype = np.dtype(jnp.dtype(entry["dtype"]))
  except (TypeError, ValueError):
    raise _corrupt(source, name, f"shape {entry['shape']!r} / dtype {entry['dtype']!r} "
                   "are not valid") from None
  allowed = (jnp.issubdtype(dtype, jnp.number) or dtype == np.bool_) if extra else \
      jnp.issubdtype(dtype, jnp.floating)
  if any(n < 0 for n in shape) or not allowed:
    raise _corrupt(source, name, f"shape {shape} / dtype {dtype} are not valid")
  s = None
  if entry["spec"] is not None:
    try:
      s = _spec_from(dict(entry["spec"]))
    except (TypeError, ValueError) as e:
      raise _corrupt(source, name, f"spec {entry['spec']!r} is not valid ({e})") from None
  keys = [_key(entry, "value")] if s is None else [_key(entry, "codes"), _key(entry, "alpha")]
  missing = [k for k in keys if k not in packed]
  if missing:
    raise _corrupt(source, name, f"arrays {missing} are missing")
  arrays = [np.asarray(packed[k]) for k in keys]
  if "sha256" in entry and _digest(entry, arrays) != entry["sha256"]:
    raise _corrupt(source, name, "its sha256 does not match its shape, dtype, spec and arrays")
  if s is None:
    value = arrays[0]
    if value.shape != shape:
      raise _corrupt(source, name, f"value has shape {value.shape}, the entry says {shape}")
    return name, extra, value.astype(dtype, copy=False)
  codes, alpha = arrays
  want = code_bytes(math.prod(shape), s.bits)
  if codes.dtype != np.uint8 or codes.ndim != 1 or codes.size != want:
    raise _corrupt(source, name, f"codes are {codes.size} {codes.dtype} values, expected "
                   f"{want} uint8 bytes for shape {shape} at {s.bits} bits")
  scales = scale_shape(shape, s)
  if alpha.size != math.prod(scales):
    raise _corrupt(source, name, f"alpha has {alpha.size} scales, expected "
                   f"{math.prod(scales)}")
  alpha = alpha.reshape(scales).astype(compute_dtype(dtype), copy=False)
  return name, extra, PackedArray(codes, alpha, shape, dtype, s)


def _load_all(packed, source):
  """``(params, extra)``: ``{path: PackedArray | array}`` each (numpy), every
  leaf checked."""
  params, extra = {}, {}
  for entry in _meta(packed, source):
    name, is_extra, leaf = _load_entry(packed, entry, source)
    (extra if is_extra else params)[name] = leaf
  return params, extra


def _open(packed, fn: str):
  if isinstance(packed, (str, os.PathLike)):
    return f"{fn}({str(packed)!r})", load_packed(packed)
  return fn, packed


def _shape(leaf):
  return tuple(leaf.shape) if is_packed(leaf) else tuple(np.shape(leaf))


def _like(values: dict, like, source: str, what: str = "`like`"):
  """``values`` (by path) in the structure of ``like``; paths and shapes checked."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree_lib.unwrap(like))
  names = [tree_lib.path_str(p) for p, _ in flat]
  # Files written before paths dropped NNX's trailing "/value" still load.
  names = [n if n in values or f"{n}/value" not in values else f"{n}/value" for n in names]
  missing = [n for n in names if n not in values]
  if missing or len(names) != len(values):
    extra = sorted(set(values) - set(names))[:5]
    raise ValueError(
        f"{source}: the packed model does not match {what} (paths missing from the packed "
        f"model: {missing[:5]}; packed but not in {what}: {extra}); pass the tree "
        "the model was packed from")
  for (_, leaf), n in zip(flat, names):
    shape = getattr(leaf, "shape", None)
    if shape is not None and tuple(shape) != _shape(values[n]):
      raise ValueError(
          f"{source}: leaf {n!r} was packed with shape {_shape(values[n])}, {what} has "
          f"{tuple(shape)}; pass the tree the model was packed from")
  return jax.tree_util.tree_unflatten(treedef, [values[n] for n in names])


def unpack(packed, like=None):
  """Restores ``ŵ`` from :func:`pack`'s output (or a path to a saved file).

  Every leaf is checked before it is used: its arrays must be present, of
  the size its shape and bits imply, and match the sha256 that :func:`pack`
  stored with them, so truncated codes or an edited shape, bits, spec or
  dtype raise a one-line ValueError naming the leaf (and the file). The
  extra state of a file is not returned (see :func:`load_packed_model`).

  Per quantized leaf ``ŵ = α · codebook[index]`` in the leaf's dtype
  (:func:`blaq_jax.dequantize`), bit for bit the ``ŵ`` that was packed.

  From a file::

    w_hat = bq.unpack("model.npz", like=params)

  Examples:
    >>> import jax.numpy as jnp
    >>> import blaq_jax as bq
    >>> params = {"w": jnp.array([[0.2, -0.6], [0.4, -0.8]]), "b": jnp.array([0.3, -0.1])}
    >>> packed = bq.pack(params, bq.quant_spec(params, bits=1))
    >>> restored = bq.unpack(packed, like=params)
    >>> print(restored["w"])
    [[ 0.5 -0.5]
     [ 0.5 -0.5]]
    >>> print(restored["b"])
    [ 0.3 -0.1]

  References:
    Hou, Yao & Kwok, `Loss-aware Binarization of Deep Networks
    <https://arxiv.org/abs/1611.01600>`_, ICLR 2017.
    Hou & Kwok, `Loss-aware Weight Quantization of Deep Networks
    <https://arxiv.org/abs/1802.08635>`_, ICLR 2018.

  Args:
    packed: the dict returned by :func:`pack`, or a path written by
      :func:`save_packed`.
    like: optional pytree with the structure of the original params (NNX
      Variables allowed); the result then has that structure. Without it, a
      flat ``{path: array}`` dict is returned.

  Returns:
    The quantized weights, bit-identical to ``quantize_params(params, spec,
    state=opt_state)`` when packed with ``state=opt_state`` (likewise with a
    curvature tree, or neither); unquantized leaves as stored.

  Raises:
    ValueError: corrupted or edited packed data, or a ``like`` whose paths or
      shapes differ from the packed leaves.
  """
  source, packed = _open(packed, "unpack")
  params, _ = _load_all(packed, source)
  values = {n: dequantize(jax.tree.map(jnp.asarray, v)) if is_packed(v) else jnp.asarray(v)
            for n, v in params.items()}
  return values if like is None else _like(values, like, source)


class PackedModel(NamedTuple):
  """What :func:`load_packed_model` returns: the packed parameters and the extra state."""

  params: Any
  extra: Any


def load_packed_model(path, like=None, *, extra_like=None) -> PackedModel:
  """Reads a packed model back as JAX values: packed parameters and extra state.

  Every leaf is checked first, as :func:`unpack` checks it (a truncated or
  edited file is a one-line error naming the file and the leaf, never wrong
  weights). Quantized leaves come back as :class:`blaq_jax.PackedArray`
  (codes and scales on the default device, ``nbytes`` the packed size), the
  others as arrays, so that ``dequantize_tree(params)`` is the ``ŵ`` that was
  packed, bit for bit.

  Example (Flax NNX; ``model`` freshly built, e.g. under ``nnx.eval_shape``)::

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    packed, rest = bq.load_packed_model("model.npz", like=params, extra_like=rest)
    forward = nnx.jit(lambda p, r, x: nnx.merge(graphdef, bq.dequantize_tree(p), r)(x))

  Args:
    path: a file written by :func:`save_packed` (or :func:`pack`'s dict).
    like: optional tree with the structure and shapes of the params (arrays,
      ``jax.ShapeDtypeStruct`` s or NNX Variables); without it, ``params`` is
      a flat ``{path: leaf}`` dict.
    extra_like: likewise for the extra state saved with ``extra=``; without
      it, ``extra`` is a flat dict (empty if the file holds none).

  Returns:
    ``PackedModel(params, extra)`` (a NamedTuple: unpack it as a pair).

  Raises:
    ValueError: a corrupted or edited file, a ``like`` / ``extra_like`` of
      other paths or shapes, or ``extra_like`` for a file saved without
      extra state.
  """
  source, packed = _open(path, "load_packed_model")
  params, extra = _load_all(packed, source)
  to_device = lambda v: jax.tree.map(jnp.asarray, v)
  params = {n: to_device(v) for n, v in params.items()}
  extra = {n: to_device(v) for n, v in extra.items()}
  if like is not None:
    params = _like(params, like, source)
  if extra_like is not None:
    if not extra and jax.tree.leaves(extra_like):
      raise ValueError(f"{source}: the file holds no extra state (it was saved without "
                       "extra=...); save it with bq.save_packed(path, packed, extra=state), "
                       "or pass extra_like=None")
    extra = _like(extra, extra_like, source, "`extra_like`")
  return PackedModel(params, extra)


def size_report(packed, print_fn: Callable[[str], Any] | None = print) -> dict:
  """Per-layer and total bytes, fp32 against packed, with the compression ratio.

  Packed bytes count the code bytes, 4 bytes per scale and, for unquantized
  leaves, their stored bytes. On-device bytes are what the loaded model
  (:func:`load_packed_model`: codes, scales, unquantized leaves and the
  extra state) holds on the device; for a file, its size on disk is given
  too (with the metadata and the archive's headers).

  Returns ``{"layers": [...], "fp32_bytes", "packed_bytes", "ratio",
  "extra_bytes", "device_bytes", "file_bytes"}`` (``file_bytes`` None unless
  ``packed`` is a path) and prints a table with ``print_fn`` (None: quiet).

  Examples:
    >>> import jax.numpy as jnp
    >>> import blaq_jax as bq
    >>> params = {"w": jnp.ones((64, 64)), "b": jnp.zeros(64)}
    >>> report = bq.size_report(bq.pack(params, bq.quant_spec(params, bits=1)), print_fn=None)
    >>> report["fp32_bytes"], report["packed_bytes"]
    (16640, 772)

  Args:
    packed: a path written by :func:`save_packed`, :func:`pack`'s dict or
      :func:`blaq_jax.pack_params`'s tree.
    print_fn: called with each line of the table.

  Raises:
    ValueError: a file that is not a packed model, or a leaf whose data is
      truncated or edited (as :func:`unpack`; names the file and the leaf).
  """
  file_bytes = None
  if isinstance(packed, (str, os.PathLike)):
    file_bytes = os.path.getsize(packed)
  source, packed = _open(packed, "size_report")
  if not (isinstance(packed, dict) and _META in packed):
    packed = serialise(packed, source=source)
  # Every leaf is checked as unpack checks it (sizes, sha256), so a truncated
  # or edited file is an error here too, not a wrong table.
  params, extra = _load_all(packed, source)
  layers: list[dict[str, Any]] = []
  for name, leaf in params.items():
    n = math.prod(_shape(leaf))
    if is_packed(leaf):
      size, bits, device = leaf.codes.nbytes + 4 * leaf.scale.size, leaf.spec.bits, leaf.nbytes
    else:
      size = device = np.asarray(leaf).nbytes
      bits = 8 * np.asarray(leaf).dtype.itemsize
    layers.append({"path": name, "params": n, "bits": bits, "fp32_bytes": 4 * n,
                   "packed_bytes": int(size), "device_bytes": int(device)})
  fp32 = sum(l["fp32_bytes"] for l in layers)
  total = sum(l["packed_bytes"] for l in layers)
  extra_bytes = int(sum(np.asarray(v).nbytes for v in extra.values()))
  device = sum(l["device_bytes"] for l in layers) + extra_bytes
  report = {"layers": layers, "fp32_bytes": fp32, "packed_bytes": total,
            "ratio": fp32 / max(total, 1), "extra_bytes": extra_bytes,
            "device_bytes": device, "file_bytes": file_bytes}
  if print_fn is not None:
    width = max([len(l["path"]) for l in layers] + [11])
    print_fn(f"{'layer':<{width}} {'params':>10} {'bits':>4} {'fp32 B':>12} "
             f"{'packed B':>12} {'ratio':>7}")
    for l in layers:
      print_fn(f"{l['path']:<{width}} {l['params']:>10} {l['bits']:>4} {l['fp32_bytes']:>12} "
               f"{l['packed_bytes']:>12} {l['fp32_bytes'] / max(l['packed_bytes'], 1):>7.2f}")
    print_fn(f"{'total':<{width}} {sum(l['params'] for l in layers):>10} {'':>4} {fp32:>12} "
             f"{total:>12} {report['ratio']:>7.2f}")
    if extra:
      print_fn(f"{'extra state':<{width}} {len(extra):>10} leaves, {extra_bytes} B "
               "(non-parameter state: batch-norm statistics, ...)")
    print_fn(f"{'on device':<{width}} {device:>10} B (codes, scales, unquantized leaves"
             f"{' and extra state' if extra else ''}, as loaded by load_packed_model)")
    if file_bytes is not None:
      print_fn(f"{'file':<{width}} {file_bytes:>10} B (with metadata and archive headers)")
  return report
