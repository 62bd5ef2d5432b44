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

import io
import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from blaq_jax._src import tree as tree_lib
from blaq_jax._src import state as state_lib
from blaq_jax._src.quantizers import QuantSpec, codes, fit_scale, nearest_code

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
  return {"bits": int(s.bits), "scheme": s.scheme, "per_channel": bool(s.per_channel),
          "tol": float(s.tol), "max_iters": int(s.max_iters)}


def pack(params, spec, curvature=None, *, state=None) -> dict:
  """Packs the quantized leaves of ``params`` into bit codes plus scales.

  Args:
    params: the latent parameters (any pytree, e.g. a Flax NNX ``State``).
    spec: the tree from :func:`blaq_jax.quant_spec` (None leaves are kept in
      full precision).
    curvature: a ``D`` tree for a cold-started projection, or None for
      ``D = 1``; ignored when ``state`` is given.
    state: the LAQ/BLAQ optimizer state (alone or inside a chain): its
      stored scales are used, so the packed model is exactly
      ``quantize_params(params, spec, state=state)``.

  Returns:
    A flat dict of numpy arrays (ready for :func:`save_packed` /
    ``np.savez``): per leaf ``"<path>::codes"`` and ``"<path>::alpha"`` or
    ``"<path>::value"``, and a JSON ``"__meta__"`` entry with shapes, dtypes
    and specs.
  """
  tree_lib.check_spec_matches(spec, params, "pack")
  spec_leaves = jax.tree.leaves(spec, is_leaf=tree_lib.is_spec_leaf)
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  if state is not None:
    curvature = None
    scale_leaves = jax.tree.leaves(
        tree_lib.map_with_spec(lambda s, w, a: (a,), spec, params,
                               state_lib.find_field(state, "scale", "pack")),
        is_leaf=lambda x: isinstance(x, tuple))
    scale_leaves = [a[0] for a in scale_leaves]
  else:
    scale_leaves = [None] * len(flat)
  if curvature is None:
    curv_leaves = [None] * len(flat)
  else:
    curv_leaves = jax.tree.leaves(
        tree_lib.map_with_spec(lambda s, w, d=None: (d,), spec, params, curvature),
        is_leaf=lambda x: isinstance(x, tuple))
    curv_leaves = [c[0] for c in curv_leaves]
  out, meta = {}, []
  for (path, w), s, d, a in zip(flat, spec_leaves, curv_leaves, scale_leaves):
    name = tree_lib.path_str(path)
    w = jnp.asarray(w)
    entry = {"path": name, "shape": list(w.shape), "dtype": str(w.dtype)}
    if s is None:
      out[f"{name}::value"] = np.asarray(w)
      entry["spec"] = None
    else:
      alpha = fit_scale(w, s, d) if a is None else jnp.asarray(a)
      b = codes(w, s, alpha)
      book = _codebook(s, b.dtype)
      n_codes = len(book) - (0 if s.is_binary else 1)  # without the -0.0 entry
      b = np.asarray(b)
      flat_b = b.reshape(-1)
      idx = np.minimum(np.searchsorted(book[:n_codes], flat_b), n_codes - 1)
      if not np.array_equal(book[idx], flat_b):
        raise ValueError(f"pack: leaf {name!r} has values outside its codebook")
      idx = np.where((flat_b == 0) & np.signbit(flat_b), n_codes, idx)  # -0.0
      out[f"{name}::codes"] = _pack_indices(idx, s.bits)
      out[f"{name}::alpha"] = np.asarray(alpha, b.dtype)
      entry["spec"] = _spec_dict(s)
    meta.append(entry)
  out[_META] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  return out


def _meta(packed) -> list[dict]:
  if _META not in packed:
    raise ValueError("unpack: not a packed model (no '__meta__' entry)")
  return json.loads(bytes(np.asarray(packed[_META], np.uint8)).decode())


def unpack(packed, like=None):
  """Restores ``ŵ`` from :func:`pack`'s output (or a path to a saved file).

  Args:
    packed: the dict returned by :func:`pack`, or a path written by
      :func:`save_packed`.
    like: optional pytree with the structure of the original params; the
      result then has that structure. Without it, a flat ``{path: array}``
      dict is returned.

  Returns:
    The quantized weights, bit-identical to ``quantize_params(params, spec,
    curvature)`` (unquantized leaves as stored).
  """
  if isinstance(packed, (str, Path)):
    packed = load_packed(packed)
  values = {}
  for entry in _meta(packed):
    name, shape, dtype = entry["path"], tuple(entry["shape"]), jnp.dtype(entry["dtype"])
    if entry["spec"] is None:
      values[name] = jnp.asarray(packed[f"{name}::value"], dtype)
      continue
    s = QuantSpec(**entry["spec"])
    compute = jnp.float32 if dtype in (jnp.bfloat16, jnp.float16) else dtype
    book = jnp.asarray(_codebook(s, compute))
    size = math.prod(shape)
    idx = _unpack_indices(np.asarray(packed[f"{name}::codes"]), s.bits, size)
    b = book[jnp.asarray(idx, jnp.int32)].reshape(shape)
    alpha = jnp.asarray(packed[f"{name}::alpha"]).astype(compute)
    values[name] = (alpha * b).astype(dtype)
  if like is None:
    return values
  flat, treedef = jax.tree_util.tree_flatten_with_path(like)
  names = [tree_lib.path_str(p) for p, _ in flat]
  missing = [n for n in names if n not in values]
  if missing or len(names) != len(values):
    raise ValueError(f"unpack: the packed model does not match `like` (missing {missing[:5]}, "
                     f"{len(values)} packed leaves for {len(names)})")
  return jax.tree_util.tree_unflatten(treedef, [values[n] for n in names])


def save_packed(path, packed: dict) -> None:
  """Writes a packed model to one ``.npz`` file."""
  with open(path, "wb") as f:
    np.savez(f, **packed)


def load_packed(path) -> dict:
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def size_report(packed, print_fn: Optional[Callable[[str], Any]] = print) -> dict:
  """Per-layer and total bytes, fp32 against packed, with the compression ratio.

  Packed bytes count the code bytes, 4 bytes per scale and, for unquantized
  leaves, their stored bytes. Returns ``{"layers": [...], "fp32_bytes",
  "packed_bytes", "ratio"}`` and prints a table with ``print_fn`` (None: quiet).
  """
  if isinstance(packed, (str, Path)):
    packed = load_packed(packed)
  layers = []
  for entry in _meta(packed):
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
    print_fn(f"{'layer':<{width}} {'params':>10} {'bits':>4} {'fp32 B':>12} {'packed B':>12} {'ratio':>7}")
    for l in layers:
      print_fn(f"{l['path']:<{width}} {l['params']:>10} {l['bits']:>4} {l['fp32_bytes']:>12} "
               f"{l['packed_bytes']:>12} {l['fp32_bytes'] / max(l['packed_bytes'], 1):>7.2f}")
    print_fn(f"{'total':<{width}} {sum(l['params'] for l in layers):>10} {'':>4} {fp32:>12} "
             f"{total:>12} {report['ratio']:>7.2f}")
  return report
