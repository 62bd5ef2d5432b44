"""The quantized weights of a parameter tree: the ``ŵ`` the forward pass uses."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from blaq_jax._src import checks
from blaq_jax._src import spec as spec_lib
from blaq_jax._src import state_lookup as state_lib
from blaq_jax._src import tree as tree_lib
from blaq_jax._src.quantizers import project, quantize
from blaq_jax._src.skipping import all_finite
from blaq_jax._src.spec import QuantSpecTree


def quantize_params(params, spec: QuantSpecTree, curvature=None, *, state=None):
  """Maps latent weights to the quantized weights ``ŵ`` the forward pass uses.

  A pure pytree map: leaves whose spec is None are returned unchanged, the
  others are replaced by their projection.

  In training, pass the optimizer state::

    qparams = bq.quantize_params(params, spec, state=opt_state)

  which computes ``ŵ = alpha · code(w / alpha)`` with the scales the LAQ/BLAQ
  update stored for these params: exactly the ``ŵ`` the update assumed (the
  projection with the committed curvature, Eq. 7 of the BLAQ paper), and an
  elementwise map. Without ``state`` each leaf is projected from a cold start
  to the alternation's fixed point (:func:`blaq_jax.quantize`), with ``D = 1``
  or the given curvature.

  Per quantized leaf::

      ŵ = α · code(w / α),   α = argmin_α min_{b ∈ C} Σ D (w - α b)²

  with ``D`` and the warm-start ``α`` of the LAQ/BLAQ state when ``state`` is
  given (exactly the ``ŵ`` its last update assumed), ``D`` = ``curvature`` or
  1 otherwise (a cold start).

  Examples:
    >>> import jax.numpy as jnp
    >>> import blaq_jax as bq
    >>> params = {"w": jnp.array([[0.2, -0.6], [0.4, -0.8]]), "b": jnp.array([0.3, -0.1])}
    >>> spec = bq.quant_spec(params, bits=1)
    >>> print(bq.quantize_params(params, spec)["w"])  # alpha = mean |w| = 0.5
    [[ 0.5 -0.5]
     [ 0.5 -0.5]]
    >>> print(bq.quantize_params(params, spec)["b"])  # spec None: unchanged
    [ 0.3 -0.1]

  References:
    Hou, Yao & Kwok, `Loss-aware Binarization of Deep Networks
    <https://arxiv.org/abs/1611.01600>`_, ICLR 2017.
    Hou & Kwok, `Loss-aware Weight Quantization of Deep Networks
    <https://arxiv.org/abs/1802.08635>`_, ICLR 2018.

  Args:
    params: the latent (full-precision) parameters.
    spec: the tree from :func:`quant_spec`.
    curvature: None for ``D = 1`` (plain projection), or a ``D`` tree such as
      :func:`blaq_jax.curvature` returns (None entries mean ``D = 1``).
      Ignored when ``state`` is given.
    state: an optax state holding a :func:`blaq_jax.laq` /
      :func:`blaq_jax.blaq` state (alone or inside chain,
      ``inject_hyperparams``, ...): its stored scales are used.
  """
  spec_lib.check_spec_matches(spec, params, "quantize_params")
  if state is not None:
    scale = state_lib.find_scales(state, spec, params, "quantize_params")
    out = project(spec, params, scale)
  else:
    if curvature is not None:
      _check_curvature(spec, params, curvature)

    def fn(s, w, d=None):
      if s is None:
        return w
      return quantize(w, s, d)

    if curvature is None:
      out = spec_lib.map_with_spec(fn, spec, params)
    else:
      out = spec_lib.map_with_spec(fn, spec, params, curvature)
  _check_finite(spec, params)
  return spec_lib.map_with_spec(
      lambda s, q, w: q if s is None else jnp.where(jnp.isfinite(w), q, w), spec, out, params)


def _check_curvature(spec, params, curvature) -> None:
  """One-line errors for a curvature tree of another structure or with bad values."""
  spec_u = tree_lib.unwrap(spec)
  flat, treedef = jax.tree_util.tree_flatten_with_path(spec_u, is_leaf=spec_lib.is_spec_leaf)
  try:
    ds = treedef.flatten_up_to(tree_lib.unwrap(curvature))
  except (ValueError, TypeError):
    raise ValueError("quantize_params: curvature does not have the tree structure of "
                     "params; pass blaq_jax.curvature(opt_state) of the optimizer that "
                     "trained these params, or None") from None
  for (path, s), d in zip(flat, ds):
    if s is not None:
      checks.positive_finite("quantize_params", f"curvature at {tree_lib.path_str(path)!r}", d)


def _check_finite(spec, params) -> None:
  """Outside ``jit``, a quantized leaf with a NaN or inf is an error (one host
  sync); under ``jit`` the non-finite entries pass through to ``ŵ`` instead."""
  if tree_lib.is_params_placeholder(params):
    return
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree_lib.unwrap(spec),
                                                       is_leaf=spec_lib.is_spec_leaf)
  ws = treedef.flatten_up_to(tree_lib.unwrap(params))
  quantized = [(p, w) for (p, s), w in zip(flat, ws)
               if s is not None and w is not None and not tree_lib.is_masked(w)]
  if any(checks.is_traced(w) or tree_lib.is_abstract(w) for _, w in quantized):
    return
  if not quantized or bool(all_finite([w for _, w in quantized])):
    return
  for path, w in quantized:
    if not bool(jnp.all(jnp.isfinite(w))):
      raise ValueError(f"quantize_params: latent weight {tree_lib.path_str(path)!r} has "
                       "NaN or inf entries; its quantized value would be meaningless. Restore "
                       "the last good checkpoint or lower the learning rate")
