"""Deployment export: bit-packed codes plus scales, and the model's size.

For a quantized leaf with spec ``s`` and curvature ``D``, :func:`pack` solves
the same projection as :func:`blaq_jax.quantize_params`,

    ŵ = alpha · b,    b in C (the code set of ``s``),

and stores the index of each ``b`` in the sorted codebook of ``s`` in
``s.bits`` bits (``2^bits - 1`` codes or 2 for binary, so every index fits),
bit-packed into bytes, plus ``alpha`` (in the compute dtype: float32 for
half-precision leaves; one per tensor, or one per output
channel). :func:`unpack` maps indices back to code values and multiplies by
``alpha`` in the leaf's dtype, which is the very product ``quantize`` computes,
(a code ``-0.0``, which rounding produces, takes the spare index ``2^bits - 1``
of the codebooks that hold 0, so even the sign of zero survives),
so ``unpack(pack(params, spec, state=opt_state))`` equals
``quantize_params(params, spec, state=opt_state)`` bit for bit (and likewise
with a curvature tree, or neither). Leaves whose spec is None are stored as they are.

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
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from blaq_jax._src import tree as tree_lib
from blaq_jax._src import state as state_lib
from blaq_jax._src.quantizers import (QuantSpec, code_index, codes, compute_dtype, fit_scale,
                                      nearest_code)

_META = "__meta__"


def _pack_indices(idx: np.ndarray, bits: int) -> np.ndarray:
  """uint8 indices < 2^bits -> bytes, ``bits`` bits each (little-endian bit order)."""
  planes = np.unpackbits(idx.reshape(-1, 1).astype(np.uint8), axis=1, bitorder="little")
  return np.packbits(planes[:, :bits].reshape(-1), bitorder="little")


def _unpack_indices(packed: np.ndarray, bits: int, size: int) -> np.ndarray:
  flat = np.unpackbits(packed, count=size * bits, bitorder="little").reshape(size, bits)
  weights = (1 << np.arange(bits)).astype(np.uint16)
  return (flat.astype(np.uint16) @ weights).astype(np.uint8)


def _codebook(s: QuantSpec, dtype) -> np.ndarray:
  """The code values exactly as the quantizer computes them, sorted.

  ``nearest_code`` of the exact codes reproduces the quantizer's arithmetic
  (e.g. ``round(x n) / n`` may be evaluated as ``round(x n) · (1/n)``), so
  these are bit-identical to the ``b`` that :func:`codes` returns. Codebooks
  that hold 0 get ``-0.0`` at the spare index ``2^bits - 1``.
  """
  book = np.asarray(nearest_code(jnp.asarray(s.codebook(), dtype), s))
  return book if s.is_binary else np.append(book, np.asarray(-0.0, book.dtype))


def _spec_dict(s: QuantSpec) -> dict:
  return {k: (v.item() if isinstance(v, np.generic) else v)
          for k, v in dataclasses.asdict(s).items()}


def _spec_from(d: dict) -> QuantSpec:
  """A QuantSpec from its saved fields (fields this version lacks are dropped)."""
  names = {f.name for f in dataclasses.fields(QuantSpec)}
  return QuantSpec(**{k: v for k, v in d.items() if k in names})


def _digest(entry: dict, arrays) -> str:
  """sha256 of the entry's description and its arrays (detects edits and truncation)."""
  h = hashlib.sha256()
  desc = {k: entry[k] for k in ("path", "shape", "dtype", "spec")}
  h.update(json.dumps(desc, sort_keys=True).encode())
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _pairs(params, spec, curvature, scale):
  """``(path, spec_leaf, param, curvature_leaf, scale_leaf)`` per param leaf,
  paired by path (None where no curvature or scale tree is given).

  None params (and their None spec) are skipped; NNX Variables are unwrapped.
  """
  tree_lib.check_spec_matches(spec, params, "pack")
  spec, params = tree_lib.unwrap(spec), tree_lib.unwrap(params)
  none = jax.tree.map(lambda s: None, spec, is_leaf=tree_lib.is_spec_leaf)
  trees = (params, none if curvature is None else tree_lib.unwrap(curvature),
           none if scale is None else tree_lib.unwrap(scale))
  out = []

  def collect(path, s, w, d=None, a=None):
    if w is not None:
      out.append((path, s, w, d, a))

  try:
    jax.tree_util.tree_map_with_path(collect, spec, *trees, is_leaf=tree_lib.is_spec_leaf)
  except (ValueError, TypeError):
    raise ValueError(
        "pack: the curvature tree does not match params; pass "
        "blaq_jax.curvature(opt_state) of the optimizer that trained these params, "
        "or None") from None
  return out


def pack(params, spec, curvature=None, *, state=None) -> dict:
  """Packs the quantized leaves of ``params`` into bit codes plus scales.

  Per quantized leaf: ``ŵ = α · b`` with ``b ∈ C`` (the code set of its spec),
  stored as ``index(b)`` in the sorted codebook, ``bits`` bits each, plus
  ``α``; ``ceil(n · bits / 8) + 4 · (number of scales)`` bytes against ``4 n``
  in float32.

  References:
    Hou, Yao & Kwok, "Loss-aware Binarization of Deep Networks", ICLR 2017.
    Hou & Kwok, "Loss-aware Weight Quantization of Deep Networks", ICLR 2018.

  Args:
    params: the latent parameters (any pytree, e.g. a Flax NNX ``State``;
      None leaves are skipped, NNX Variables unwrapped).
    spec: the tree from :func:`blaq_jax.quant_spec` (None leaves are kept in
      full precision). Each spec leaf is paired with the param at the same
      path.
    curvature: a ``D`` tree for a cold-started projection, or None for
      ``D = 1``; ignored when ``state`` is given.
    state: the LAQ/BLAQ optimizer state (alone or inside a chain): its
      stored scales are used, so the packed model is exactly
      ``quantize_params(params, spec, state=state)``.

  Returns:
    A flat dict of numpy arrays (ready for :func:`save_packed` /
    ``np.savez``): per leaf ``"<path>::codes"`` and ``"<path>::alpha"`` or
    ``"<path>::value"``, and a JSON ``"__meta__"`` entry with shapes, dtypes,
    specs and a sha256 per leaf that :func:`unpack` checks.
  """
  out, meta = {}, []
  scale = state_curv = None
  if state is not None:
    curvature, scale = None, state_lib.find_field(state, "scale", "pack")
    tree_lib.check_spec_matches(spec, params, "pack")
    tree_lib.check_state_scales(spec, params, scale, "pack")
    state_curv = state_lib.find_field(state, "curvature", "pack")
  curv_pairs = (None if state_curv is None else
                {tree_lib.path_str(p): d for p, _, _, d, _ in
                 _pairs(params, spec, state_curv, None)})
  for path, s, w, d, a in _pairs(params, spec, curvature, scale):
    name = tree_lib.path_str(path)
    w = jnp.asarray(w)
    if s is not None and a is not None:
      _check_fixed_point(name, w, s, curv_pairs.get(name), a)
    entry = {"path": name, "shape": list(w.shape), "dtype": str(w.dtype)}
    if s is None:
      out[f"{name}::value"] = np.asarray(w)
      entry["spec"] = None
      arrays = [out[f"{name}::value"]]
    else:
      alpha = fit_scale(w, s, d) if a is None else jnp.asarray(a)
      b = codes(w, s, alpha)
      book = _codebook(s, b.dtype)
      n_codes = len(book) - (0 if s.is_binary else 1)  # without the -0.0 entry
      b = np.asarray(b)
      flat_b = b.reshape(-1)
      idx = np.asarray(code_index(flat_b, s))
      if not np.array_equal(book[idx], flat_b):
        raise ValueError(f"pack: leaf {name!r} has values outside its codebook")
      idx = np.where((flat_b == 0) & np.signbit(flat_b), n_codes, idx)  # -0.0
      out[f"{name}::codes"] = _pack_indices(idx, s.bits)
      out[f"{name}::alpha"] = np.asarray(alpha, b.dtype)
      entry["spec"] = _spec_dict(s)
      arrays = [out[f"{name}::codes"], out[f"{name}::alpha"]]
    entry["sha256"] = _digest(entry, arrays)
    meta.append(entry)
  out[_META] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  return out


# How far one more round of the projection may move a state's scale (relative)
# before the scale is taken to belong to another spec. A state's scale is the
# fixed point for its params; a frozen or rounded weight moves it a little,
# another bit width or scheme by tens of percent.
FIXED_POINT_RTOL = 0.1


def _check_fixed_point(name, w, s: QuantSpec, d, alpha) -> None:
  """Refuses a state scale that is not (nearly) a fixed point of ``s``'s projection."""
  alpha = np.asarray(alpha, np.float64)
  again = np.asarray(fit_scale(w, dataclasses.replace(s, max_iters=1), d, jnp.asarray(alpha)),
                     np.float64)
  if not (np.all(np.isfinite(alpha)) and np.all(alpha > 0)):
    raise ValueError(f"pack: the optimizer state's scale for {name!r} is not finite and > 0; "
                     "pass the state of the optimizer that trained these params")
  if np.any(np.abs(again - alpha) > FIXED_POINT_RTOL * np.abs(alpha)):
    raise ValueError(
        f"pack: the optimizer state's scale for {name!r} does not fit its spec "
        f"({_spec_dict(s)}): one more round of the projection moves it from "
        f"{float(alpha.reshape(-1)[0]):.4g} to {float(again.reshape(-1)[0]):.4g}; the state "
        "belongs to another spec (bits, scheme) or other params, pass the state of the "
        "optimizer built with this spec")


def _meta(packed, source: str = "unpack") -> list[dict]:
  if _META not in packed:
    raise ValueError(f"{source}: not a packed model (no '__meta__' entry); write it with "
                     "blaq_jax.pack / save_packed")
  try:
    meta = json.loads(bytes(np.asarray(packed[_META], np.uint8)).decode())
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{source}: the '__meta__' entry is not valid JSON ({e}); the file "
                     "is corrupted, export it again with blaq_jax.pack") from None
  if not isinstance(meta, list):
    raise ValueError(f"{source}: the '__meta__' entry is not a list of leaves; the file "
                     "is corrupted, export it again with blaq_jax.pack")
  return meta


def _corrupt(source, name, what):
  return ValueError(f"{source}: leaf {name!r}: {what}; the packed data is corrupted or "
                    "was edited, export it again with blaq_jax.pack")


def _unpack_entry(packed, entry, source):
  """Checks one leaf's entry and arrays, and returns its ``ŵ``."""
  name = entry.get("path", "?") if isinstance(entry, dict) else "?"
  if not isinstance(entry, dict) or not {"path", "shape", "dtype", "spec"} <= set(entry):
    raise _corrupt(source, name, "its '__meta__' entry lacks path/shape/dtype/spec")
  try:
    shape = tuple(int(n) for n in entry["shape"])
    dtype = jnp.dtype(entry["dtype"])
  except (TypeError, ValueError):
    raise _corrupt(source, name, f"shape {entry['shape']!r} / dtype {entry['dtype']!r} "
                   "are not valid") from None
  if any(n < 0 for n in shape) or not jnp.issubdtype(dtype, jnp.floating):
    raise _corrupt(source, name, f"shape {shape} / dtype {dtype} are not valid")
  s = None
  if entry["spec"] is not None:
    try:
      s = _spec_from(dict(entry["spec"]))
    except (TypeError, ValueError) as e:
      raise _corrupt(source, name, f"spec {entry['spec']!r} is not valid ({e})") from None
  keys = [f"{name}::value"] if s is None else [f"{name}::codes", f"{name}::alpha"]
  missing = [k for k in keys if k not in packed]
  if missing:
    raise _corrupt(source, name, f"arrays {missing} are missing")
  arrays = [np.asarray(packed[k]) for k in keys]
  if "sha256" in entry and _digest(entry, arrays) != entry["sha256"]:
    raise _corrupt(source, name, "its sha256 does not match its shape, dtype, spec and arrays")
  size = math.prod(shape)
  if s is None:
    value = arrays[0]
    if value.shape != shape:
      raise _corrupt(source, name, f"value has shape {value.shape}, the entry says {shape}")
    return jnp.asarray(value, dtype)
  codes, alpha = arrays
  want = math.ceil(size * s.bits / 8)
  if codes.dtype != np.uint8 or codes.ndim != 1 or codes.size != want:
    raise _corrupt(source, name, f"codes are {codes.size} {codes.dtype} values, expected "
                   f"{want} uint8 bytes for shape {shape} at {s.bits} bits")
  n_scales = shape[-1] if (s.per_channel and len(shape) >= 2) else 1
  if alpha.size != n_scales:
    raise _corrupt(source, name, f"alpha has {alpha.size} scales, expected {n_scales}")
  compute = compute_dtype(dtype)
  book = jnp.asarray(_codebook(s, compute))
  idx = _unpack_indices(codes, s.bits, size)
  if size and int(idx.max()) >= len(book):
    raise _corrupt(source, name, f"a code index {int(idx.max())} is outside the "
                   f"{len(book)}-entry codebook")
  b = book[jnp.asarray(idx, jnp.int32)].reshape(shape)
  return (jnp.asarray(alpha).astype(compute) * b).astype(dtype)


def unpack(packed, like=None):
  """Restores ``ŵ`` from :func:`pack`'s output (or a path to a saved file).

  Every leaf is checked before it is used: its arrays must be present, of
  the size its shape and bits imply, and match the sha256 that :func:`pack`
  stored with them, so truncated codes or an edited shape, bits, spec or
  dtype raise a one-line ValueError naming the leaf (and the file).

  Per quantized leaf ``ŵ = α · codebook[index]`` in the leaf's dtype, bit for
  bit the ``ŵ`` that was packed.

  References:
    Hou, Yao & Kwok, "Loss-aware Binarization of Deep Networks", ICLR 2017.
    Hou & Kwok, "Loss-aware Weight Quantization of Deep Networks", ICLR 2018.

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
    ValueError: corrupted or edited packed data, or a ``like`` whose paths
      differ from the packed leaves.
  """
  source = "unpack"
  if isinstance(packed, (str, Path)):
    source = f"unpack({str(packed)!r})"
    packed = load_packed(packed)
  values = {}
  for entry in _meta(packed, source):
    values[entry.get("path") if isinstance(entry, dict) else None] = _unpack_entry(
        packed, entry, source)
  if like is None:
    return values
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree_lib.unwrap(like))
  names = [tree_lib.path_str(p) for p, _ in flat]
  # Files written before paths dropped NNX's trailing "/value" still load.
  names = [n if n in values or f"{n}/value" not in values else f"{n}/value" for n in names]
  missing = [n for n in names if n not in values]
  if missing or len(names) != len(values):
    extra = sorted(set(values) - set(names))[:5]
    raise ValueError(
        f"{source}: the packed model does not match `like` (paths missing from the packed "
        f"model: {missing[:5]}; packed but not in `like`: {extra}); pass the params tree "
        "the model was packed from")
  for (path, leaf), n in zip(flat, names):
    shape = getattr(leaf, "shape", None)
    if shape is not None and tuple(shape) != tuple(values[n].shape):
      raise ValueError(
          f"{source}: leaf {n!r} was packed with shape {tuple(values[n].shape)}, `like` has "
          f"{tuple(shape)}; pass the params tree the model was packed from")
  return jax.tree_util.tree_unflatten(treedef, [values[n] for n in names])


def save_packed(path, packed: dict) -> None:
  """Writes a packed model to one ``.npz`` file, atomically.

  The archive is written to a temporary file next to ``path`` and then
  renamed over it (``os.replace``), so an interrupted write leaves either the
  old file or the new one, never a truncated archive.
  """
  path = Path(path)
  if not isinstance(packed, dict) or _META not in packed:
    raise ValueError(f"save_packed: {str(path)!r}: packed must be the dict blaq_jax.pack "
                     "returns (it has no '__meta__' entry)")
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **packed)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def load_packed(path) -> dict:
  """Reads a file written by :func:`save_packed` into the dict :func:`pack` returns.

  Args:
    path: the ``.npz`` file.

  Returns:
    ``{name: numpy array}``, to pass to :func:`unpack` or :func:`size_report`
    (both also take the path directly). Nothing is checked here;
    :func:`unpack` checks every leaf.

  Raises:
    ValueError: the file is not an ``.npz`` archive, or is truncated (names
      the file).
  """
  try:
    with np.load(path, allow_pickle=False) as z:
      if not hasattr(z, "files"):
        raise ValueError("not an .npz archive")
      return {k: z[k] for k in z.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise ValueError(f"load_packed: {str(path)!r} is not a packed model written by "
                     f"blaq_jax.save_packed ({' '.join(str(e).split())[:120]})") from None


def size_report(packed, print_fn: Optional[Callable[[str], Any]] = print) -> dict:
  """Per-layer and total bytes, fp32 against packed, with the compression ratio.

  Packed bytes count the code bytes, 4 bytes per scale and, for unquantized
  leaves, their stored bytes. Returns ``{"layers": [...], "fp32_bytes",
  "packed_bytes", "ratio"}`` and prints a table with ``print_fn`` (None: quiet).

  Raises:
    ValueError: a file that is not a packed model, or a leaf whose data is
      truncated or edited (as :func:`unpack`; names the file and the leaf).
  """
  source = "size_report"
  if isinstance(packed, (str, Path)):
    source = f"size_report({str(packed)!r})"
    packed = load_packed(packed)
  layers = []
  for entry in _meta(packed, source):
    # Every leaf is checked as unpack checks it (sizes, sha256), so a
    # truncated or edited file is an error here too, not a wrong table.
    _unpack_entry(packed, entry, source)
    name = entry["path"]
    n = math.prod(entry["shape"])
    fp32 = 4 * n
    if entry["spec"] is None:
      size, bits = np.asarray(packed[f"{name}::value"]).nbytes, 32
    else:
      size = packed[f"{name}::codes"].nbytes + 4 * packed[f"{name}::alpha"].size
      bits = entry["spec"]["bits"]
    layers.append({"path": name, "params": n, "bits": bits, "fp32_bytes": fp32,
                   "packed_bytes": int(size)})
  fp32 = sum(l["fp32_bytes"] for l in layers)
  total = sum(l["packed_bytes"] for l in layers)
  report = {"layers": layers, "fp32_bytes": fp32, "packed_bytes": total,
            "ratio": fp32 / max(total, 1)}
  if print_fn is not None:
    width = max([len(l["path"]) for l in layers] + [5])
    print_fn(f"{'layer':<{width}} {'params':>10} {'bits':>4} {'fp32 B':>12} "
             f"{'packed B':>12} {'ratio':>7}")
    for l in layers:
      print_fn(f"{l['path']:<{width}} {l['params']:>10} {l['bits']:>4} {l['fp32_bytes']:>12} "
               f"{l['packed_bytes']:>12} {l['fp32_bytes'] / max(l['packed_bytes'], 1):>7.2f}")
    print_fn(f"{'total':<{width}} {sum(l['params'] for l in layers):>10} {'':>4} {fp32:>12} "
             f"{total:>12} {report['ratio']:>7.2f}")
  return report
