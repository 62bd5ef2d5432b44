"""Finding the curvature ``D`` inside any optax state."""

from __future__ import annotations

import jax

from blaq_jax._src import tree as tree_lib
from blaq_jax._src.blaq import BLAQState
from blaq_jax._src.cheap_lookahead import BLAQReuseState
from blaq_jax._src.laq import LAQState

_STATES = (LAQState, BLAQState, BLAQReuseState)


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


def curvature(opt_state):
  """Returns the ``D`` pytree of the LAQ/BLAQ state inside ``opt_state``.

  Works on the state of :func:`blaq_jax.laq` / :func:`blaq_jax.blaq` alone or
  nested in ``optax.chain``, ``optax.inject_hyperparams``, ``optax.masked``
  or ``optax.multi_transform`` (several LAQ/BLAQ states are merged leafwise).
  Entries are arrays for quantized leaves and None elsewhere, ready for
  :func:`blaq_jax.quantize_params`.

  Raises:
    ValueError: if ``opt_state`` holds no LAQ/BLAQ state.
  """
  found = tree_lib.find_states(opt_state, _STATES)
  if not found:
    raise ValueError(
        "curvature: opt_state holds no LAQState/BLAQState; build the optimizer "
        "with blaq_jax.laq or blaq_jax.blaq")
  return _merge([s.curvature for s in found])
