"""Finding the curvature ``D`` and the scales inside any optax state."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from blaq_jax._src import loss_aware as core
from blaq_jax._src import spec as spec_lib
from blaq_jax._src import tree as tree_lib
from blaq_jax._src.quantizers import scale_shape

def _is_quant_state(x) -> bool:
  """A LAQ/BLAQ-shaped state: a NamedTuple with ``scale`` and either a stored
  ``curvature`` (BLAQ) or what it is computed from (LAQ: ``nu``, ``b2``, ``eps``)."""
  fields = getattr(type(x), "_fields", None)
  if not isinstance(x, tuple) or fields is None or "scale" not in fields:
    return False
  return "curvature" in fields or all(f in fields for f in ("nu", "count", "b2", "eps"))


def _curvature_of(s):
  if "curvature" in s._fields:
    return s.curvature
  den = core.denominator(s.nu, s.count, s.b2, s.eps)
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
  """``field`` of the LAQ/BLAQ states inside ``opt_state``, merged leafwise."""
  opt_state = tree_lib.unwrap(opt_state)  # an nnx.Optimizer's opt_state holds Variables
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_quant_state)
           if _is_quant_state(s)]
  if not found:
    raise ValueError(
        f"{where}: the optimizer state holds no LAQ/BLAQ state (a state with a "
        "'scale' field); build the optimizer with blaq_jax.laq or "
        "blaq_jax.blaq")
  get = _curvature_of if field == "curvature" else (lambda s: getattr(s, field))
  return _merge([get(s) for s in found])


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
