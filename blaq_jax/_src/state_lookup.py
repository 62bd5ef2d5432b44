"""Looking up the scales and the curvature ``D`` of the LAQ/BLAQ states in any optax state.

The LAQ/BLAQ states may sit alone or anywhere inside ``optax.chain``,
``optax.inject_hyperparams``, ``optax.masked``, ``optax.multi_transform`` or
an ``nnx.Optimizer``'s ``opt_state``; their fields are found by name with
:func:`optax.tree_utils.tree_get_all_with_path` and merged leafwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from optax import tree_utils as otu

from blaq_jax._src import loss_aware
from blaq_jax._src import spec as spec_lib
from blaq_jax._src import tree as tree_lib
from blaq_jax._src.laq import LAQState
from blaq_jax._src.quantizers import scale_shape


def _is_state_field(path, value) -> bool:
  """A field of a state NamedTuple, not a dict entry of the same name inside a
  tree like params (a LayerNorm's ``scale`` in Adam's moments)."""
  del value
  return bool(path) and isinstance(path[-1], otu.NamedTupleKey)


# Jitted: called eagerly (export) it compiles once instead of dispatching
# each leaf's operations.
_denominator = jax.jit(loss_aware.denominator)


def _laq_curvature(s: LAQState):
  """LAQ's ``D``, computed from its second moment (LAQ does not store it), at
  the leaves that have a scale (None elsewhere)."""
  den = _denominator(s.nu, s.count, s.b2, s.eps)
  return jax.tree.map(lambda a, d: None if a is None else d, s.scale, den,
                      is_leaf=lambda x: x is None or tree_lib.is_masked(x))


def _merge(trees):
  """Leafwise, the first array among the trees (None where there is none,
  e.g. at leaves masked out by ``optax.multi_transform``)."""

  def is_leaf(x):
    return x is None or tree_lib.is_masked(x)

  def pick(*xs):
    for x in xs:
      if not is_leaf(x):
        return x
    return None

  return jax.tree.map(pick, *trees, is_leaf=is_leaf)


def find_field(opt_state, field: str, where: str):
  """``field`` (``"scale"`` or ``"curvature"``) of the LAQ/BLAQ states inside
  ``opt_state``, merged leafwise; a one-line ValueError naming ``where`` if
  there is none."""
  opt_state = tree_lib.unwrap(opt_state)  # an nnx.Optimizer's opt_state holds Variables
  found = [v for _, v in otu.tree_get_all_with_path(opt_state, field, _is_state_field)]
  if field == "curvature":
    found += [_laq_curvature(s)
              for _, s in otu.tree_get_all_with_path(opt_state, LAQState.__name__)]
  if not found:
    raise ValueError(
        f"{where}: the optimizer state holds no LAQ/BLAQ state (a state with a "
        "'scale' field); build the optimizer with blaq_jax.laq or "
        "blaq_jax.blaq")
  return _merge(found)


def find_scales(opt_state, spec, params, where: str):
  """The scales of the LAQ/BLAQ states inside ``opt_state``, checked against
  ``spec`` and ``params`` (:func:`check_state_scales`)."""
  scale = find_field(opt_state, "scale", where)
  check_state_scales(spec, params, scale, where)
  return scale


def curvature(opt_state):
  """Returns the ``D`` pytree of the LAQ/BLAQ state inside ``opt_state``.

  Works on the state of :func:`blaq_jax.laq` / :func:`blaq_jax.blaq` alone or
  nested in ``optax.chain``, ``optax.inject_hyperparams``, ``optax.masked``
  or ``optax.multi_transform`` (several LAQ/BLAQ states are merged leafwise).
  Entries are arrays for quantized leaves and None elsewhere: BLAQ's stored
  ``D_mix``, or LAQ's ``D = sqrt(v / (1 - b2^count)) + eps`` computed from its
  second moment (LAQ does not store ``D``; this equals the ``D`` its update
  used up to the rounding of ``b2^t``, about 1e-6 relative in float32). For
  the weights
  the model runs with, use ``quantize_params(params, spec, state=opt_state)``,
  which also uses the stored scales.

  Examples:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import blaq_jax as bq
    >>> params = {"w": jnp.array([[0.2, -0.6], [0.4, -0.8]]), "b": jnp.zeros(2)}
    >>> tx = bq.laq(0.1, bq.quant_spec(params, bits=1))
    >>> grads = {"w": jnp.array([[1.0, -2.0], [0.5, 4.0]]), "b": jnp.ones(2)}
    >>> _, state = tx.update(grads, tx.init(params), params)
    >>> print(np.asarray(bq.curvature(state)["w"]).round(3))  # |g| after one step
    [[1.  2. ]
     [0.5 4. ]]
    >>> print(bq.curvature(state)["b"])  # not quantized
    None

  Raises:
    ValueError: if ``opt_state`` holds no LAQ/BLAQ state.
  """
  return find_field(opt_state, "curvature", "curvature")


def check_state_scales(spec, params, scale, where: str) -> None:
  """Raises a one-line ValueError naming ``where`` and the path unless the
  state's ``scale`` tree belongs to ``spec`` and ``params``: an array of the
  leaf's scale shape (one per tensor, or per channel) at every quantized leaf.

  A state of another model, or of a spec with another ``per_channel``, fails
  here; one of another bit width has scales of the same shape (see
  :func:`blaq_jax.pack`, which also checks the values).
  """
  if tree_lib.is_params_placeholder(params):
    return
  spec, params, scale = tree_lib.unwrap(spec), tree_lib.unwrap(params), tree_lib.unwrap(scale)
  flat, treedef = jax.tree_util.tree_flatten_with_path(spec, is_leaf=spec_lib.is_spec_leaf)
  hint = ("pass the state of the optimizer built with this spec for these params "
          "(a checkpoint of another run or model does not fit)")
  try:
    ws = treedef.flatten_up_to(params)
    scales = treedef.flatten_up_to(scale)
  except (ValueError, TypeError):
    raise ValueError(f"{where}: the optimizer state's scales do not have the tree "
                     f"structure of the spec and params; {hint}") from None
  for (path, s), w, a in zip(flat, ws, scales):
    if (not isinstance(s, spec_lib.QuantSpec) or w is None or tree_lib.is_masked(w)
        or tree_lib.is_masked(a)):
      continue
    want = scale_shape(jnp.shape(w), s)
    if a is None or jnp.shape(a) != want:
      got = "no scale" if a is None else f"a scale of shape {jnp.shape(a)}"
      raise ValueError(f"{where}: the optimizer state has {got} for "
                       f"{tree_lib.path_str(path)!r}, "
                       f"its spec needs shape {want}; {hint}")
