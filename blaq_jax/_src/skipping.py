"""Counting steps, and skipping a step whose gradient, learning rate or result is not finite.

The skip is a leafwise select inside the fused update, not a branch: a
skipped step keeps every buffer exactly and costs no extra pass over the
weights. Shared by LAQ, BLAQ and the variants in ``blaq_jax.contrib``.
"""

from __future__ import annotations

import functools
from typing import cast

import jax
import jax.numpy as jnp
import optax

from blaq_jax._src import checks
from blaq_jax._src import spec as spec_lib
from blaq_jax._src import tree as tree_lib


def increment(count: jax.Array) -> jax.Array:
  """``optax.safe_increment`` of a state's step count (an int32 array, which
  is what it returns for one; optax annotates the result as any number)."""
  return cast(jax.Array, optax.safe_increment(count))


def all_finite(*trees):
  """Whether every leaf is finite, as one sum per leaf: ``sum(g - g)`` is 0
  when all of ``g`` is finite and NaN otherwise (``inf - inf`` is NaN).

  On XLA:CPU this is one read of ``g``: ``sum(0 * g)`` compiled to a library
  reduction that also read a materialised array of zeros, and ``isfinite``
  with a count, or a NaN-ignoring ``max``, cost more or missed NaNs.
  """
  leaves = [l for t in trees for l in jax.tree.leaves(t)]
  if not leaves:
    return jnp.array(True)
  sums = [jnp.sum(l.astype(jnp.float32) - l.astype(jnp.float32)) for l in leaves]
  return jnp.isfinite(functools.reduce(jnp.add, sums))


def select(ok, new, old):
  """Leafwise ``where(ok, new, old)`` with a scalar ``ok`` (``new`` if ok is None).

  Inside the elementwise update XLA fuses it into the same loop, so skipping
  a step costs no extra pass over the weights (a ``lax.cond`` around the
  update would cut that fusion), and a skipped step keeps ``old`` exactly.
  """
  if ok is None:
    return new
  return tree_lib.map_none(lambda n, o: jnp.where(ok, n, o), new, old)


def counted(ok, count, skipped):
  """``(count, skipped)`` after a step that is applied if ``ok`` (None: always)."""
  if ok is None:
    return increment(count), skipped
  return count + ok.astype(count.dtype), skipped + (~ok).astype(skipped.dtype)


def step_ok(g, lr, skip_nonfinite: bool):
  """Whether a step may be applied: a finite gradient and a finite, non-negative
  learning rate (a scalar check, fused into the update); None when off."""
  if not skip_nonfinite:
    return None
  lr = jnp.asarray(lr)
  return all_finite(g) & jnp.isfinite(lr) & (lr >= 0)


def latent_check_needed(eps) -> bool:
  """Whether new latent weights can be non-finite though the gradient, the
  learning rate and the old weights are finite: only if ``eps`` may be 0.
  With ``eps > 0``, ``D >= eps`` and Adam's ``m̂ / D`` stays bounded (a
  gradient whose square overflows makes ``D`` infinite and the step 0)."""
  return not (checks.is_concrete_number(eps) and eps > 0)


def skip_if_nonfinite(ok, new_params, params, new_state, state, spec, needed=True):
  """A step whose new latent weights are not finite is skipped and counted.

  ``new_state`` is the state after a step that applied ``ok`` (None: the
  check is off, nothing changes; ``needed`` False, see
  :func:`latent_check_needed`: nothing to check). If ``new_params`` hold a
  NaN or inf (``eps = 0`` with a zero second moment), the params and the
  state keep their old values and ``skipped`` grows by 1, as for a
  non-finite gradient. The check waits for the step's scales and then
  selects every buffer again, about a third of a LAQ update's cost on
  XLA:CPU, which is why it runs only when it can fire. A quantized leaf is
  checked through its new scale, whose sums run over all its weights (a
  non-finite weight makes it non-finite); other leaves are checked
  directly. A stored ``curvature`` is left as the step computed it: no
  update reads it back, and selecting it again would change how XLA
  fuses the scale fit that consumes it (BLAQ with ``a = 1`` would no longer
  match LAQ bit for bit). Returns ``(new_params, new_state)``.
  """
  if ok is None or not needed:
    return new_params, new_state
  witnesses = spec_lib.map_with_spec(lambda s, w, a: w if s is None else a,
                                     spec, new_params, new_state.scale)
  fine = all_finite(witnesses)
  kept = state._replace(skipped=state.skipped + 1)  # one skip, whatever ok was
  merged = {f: n if f == "curvature" else select(fine, n, o)
            for f, n, o in zip(state._fields, new_state, kept)}
  return select(fine, new_params, params), type(state)(**merged)
