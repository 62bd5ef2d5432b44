"""Export to qwix's quantized-array layout (``qwix.QArray``), for qwix's serving path.

A blaq_jax linear code of ``k`` bits is ``b = j / n`` with an integer
``j ∈ [-n, n]``, ``n = 2^(k-1) - 1`` (ternary: ``n = 1``), so

    ŵ = α · j / n = j · (α / n),

which is qwix's symmetric integer layout: ``qvalue = j`` (qwix's ``intk``,
stored as ``int4`` up to 4 bits and ``int8`` above, as qwix stores them),
``scale = α / n`` of the same rank as the weight (per tensor, or per output
channel), no zero point. ``qwix.dequantize`` computes ``j · (α / n)``, the
``ŵ`` of the trained model to float32 rounding (one rounding of ``α / n``
instead of ``j / n``).

Not representable, and refused with a one-line error naming the leaf:
1-bit codes (``±1``: no zero code, and qwix has no 1-bit integer type;
``int2`` would double the size) and log codes (``±2^-j``: qwix's integer
types are uniform grids).

References:
  Hou & Kwok, `Loss-aware Weight Quantization of Deep Networks
  <https://arxiv.org/abs/1802.08635>`_, ICLR 2018.
  qwix: https://github.com/google/qwix
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from blaq_jax._src import tree as tree_lib
from blaq_jax._src.packed import is_packed, pack_tree, unpack_indices
from blaq_jax._src.spec import QuantSpecTree

# qwix's name of the k-bit signed integer type (its synthetic "intk" types are
# stored in int4 / int8 containers).
_QTYPES = {2: "int2", 3: "int3", 4: jnp.int4, 5: "int5", 6: "int6", 7: "int7", 8: jnp.int8}


def _qwix():
  try:
    import qwix
  except ImportError:
    raise ImportError("to_qwix needs qwix: pip install 'blaq_jax[qwix]'") from None
  return qwix


def to_qwix(params, spec: QuantSpecTree, curvature=None, *, state=None):
  """Exports the quantized leaves of a model as ``qwix.QArray`` s.

  Per quantized leaf (linear or ternary codes, 2 to 8 bits, per tensor or per
  output channel) ``ŵ = α · j / n`` becomes ``QArray(qvalue=j, scale=α / n,
  qtype="intk")`` with ``j ∈ [-n, n]``, ``n = 2^(k-1) - 1``;
  ``qwix.dequantize`` of it is ``ŵ`` to float32 rounding. Leaves without a
  spec stay as they are.

  Example (Flax NNX, into a qwix PTQ model ``ptq`` built with
  ``qwix.quantize_model(model, qwix.PtqProvider(rules), x)``)::

    exported = bq.to_qwix(nnx.state(model, nnx.Param), spec, state=opt_state)
    is_q = lambda q: isinstance(q, qwix.QArray)
    # A PTQ model holds each quantized kernel as {"array": {"qvalue", "scale"}}.
    ckpt = jax.tree.map(lambda q: {"array": {"qvalue": q.qvalue, "scale": q.scale}}
                        if is_q(q) else q, nnx.to_pure_dict(exported), is_leaf=is_q)
    nnx.update(ptq, ckpt)   # rules: weight_qtype = exported leaf's .qtype

  References:
    Hou & Kwok, `Loss-aware Weight Quantization of Deep Networks
    <https://arxiv.org/abs/1802.08635>`_, ICLR 2018.

  Args:
    params: the latent parameters (NNX Variables unwrapped).
    spec: the tree from :func:`blaq_jax.quant_spec`.
    curvature: a ``D`` tree for a cold-started projection; ignored with ``state``.
    state: the LAQ/BLAQ optimizer state whose scales give the trained ``ŵ``.

  Returns:
    A pure tree like ``params`` with a ``qwix.QArray`` at every quantized leaf.

  Raises:
    ImportError: qwix is not installed (``pip install 'blaq_jax[qwix]'``).
    ValueError: a leaf whose format qwix cannot hold (1-bit or log codes),
      naming it.
  """
  packed = pack_tree(params, spec, curvature, state, "to_qwix")
  for path, leaf in jax.tree_util.tree_flatten_with_path(packed, is_leaf=is_packed)[0]:
    if is_packed(leaf):
      _check_representable(tree_lib.path_str(path), leaf.spec)
  qwix = _qwix()

  def convert(path, leaf):
    if not is_packed(leaf):
      return leaf
    s = leaf.spec
    n = s.levels
    idx = unpack_indices(leaf.codes, s.bits, leaf.size).astype(jnp.int32)
    j = jnp.where(idx > 2 * n, 0, idx - n)   # the spare index is the code -0.0
    container = jnp.int4 if s.bits <= 4 else jnp.int8
    scale = (jnp.asarray(leaf.scale) / n).astype(leaf.dtype)
    return qwix.QArray(j.astype(container).reshape(leaf.shape), scale, None, _QTYPES[s.bits])

  return jax.tree_util.tree_map_with_path(convert, packed, is_leaf=is_packed)


def _check_representable(name, s) -> None:
  if s.is_binary:
    raise ValueError(f"to_qwix: leaf {name!r} is 1-bit: its codes ±1 have no zero and qwix "
                     "has no 1-bit integer type; quantize it at 2+ bits, or serve it with "
                     "blaq_jax.pack_params and dequantize_tree")
  if s.group_size is not None:
    raise ValueError(f"to_qwix: leaf {name!r} has group-wise scales (group_size="
                     f"{s.group_size}), which this export does not map to qwix's tiled "
                     "scales; export a per-channel spec, or serve it with "
                     "blaq_jax.pack_params and dequantize_tree")
  if s.scheme == "log":
    raise ValueError(f"to_qwix: leaf {name!r} has log codes (±2^-j), which qwix's uniform "
                     "integer types cannot hold; use scheme 'linear' or 'ternary', or serve "
                     "it with blaq_jax.pack_params and dequantize_tree")
