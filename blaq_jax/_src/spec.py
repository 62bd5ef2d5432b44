"""Building quantization specs for a parameter pytree and applying them."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from blaq_jax._src import checks
from blaq_jax._src import tree as tree_lib
from blaq_jax._src import loss_aware
from blaq_jax._src import state_lookup as state_lib
from blaq_jax._src.quantizers import QuantSpec, quantize

Override = int | QuantSpec | None


def _default_include(path: str, leaf) -> bool:
  del path
  return getattr(leaf, "ndim", 0) >= 2


def quant_spec(
    params,
    bits: int,
    *,
    scheme: str = "linear",
    per_channel: bool = False,
    tol: float = 1e-6,
    max_iters: int = 50,
    group_size: int | None = None,
    include: None | str | Callable[[str, Any], bool] = None,
    overrides: Mapping[str, Override] | None = None,
):
  """Returns a pytree like ``params`` with a :class:`QuantSpec` or None per leaf.

  Each selected leaf gets the code set ``C`` of its :class:`QuantSpec`::

      bits=1                   C = {-1, +1}
      bits=k, "linear"         C = {-1, ..., -1/n, 0, 1/n, ..., 1},  n = 2^(k-1) - 1
      bits=2, "ternary"        C = {-1, 0, +1}
      bits=k, "log"            C = {0} ∪ {±2^-j : j = 0 .. 2^(k-1) - 2}

  and the projection ``Q_D(w) = α · b``, ``(α, b) = argmin Σ D (w - α b)²``.

  References:
    Hou & Kwok, "Loss-aware Weight Quantization of Deep Networks", ICLR 2018
    (linear and logarithmic code sets).
    Li, Zhang & Liu, "Ternary Weight Networks", 2016.

  Args:
    params: the parameter pytree (dicts, tuples, Flax NNX ``State`` such as
      ``nnx.state(model, nnx.Param)``; NNX Variables are unwrapped, so the
      spec is a pure tree that matches both ``nnx.state(model, nnx.Param)``
      and the pure state ``nnx.Optimizer`` passes to ``update``; paths carry
      no trailing ``/value``). None leaves stay None.
    bits: default bit width (1..8).
    scheme, per_channel, tol, max_iters: defaults for :class:`QuantSpec`.
    group_size: default ``g`` of group-wise scales (None: per tensor or per
      channel): one scale per group of ``g`` consecutive weights along each
      kernel's input axis (axis -2: ``in`` of a dense kernel ``(in, out)``,
      ``c_in`` of a conv kernel ``(h, w, c_in, c_out)``), per output channel.
      A quantized leaf whose input axis ``g`` does not divide is an error
      naming it; give it another :class:`QuantSpec` (or None) in
      ``overrides``. An int override keeps ``group_size``.
    include: which leaves are quantized by default. None quantizes every
      floating leaf with ``ndim >= 2`` (kernels) and leaves biases and norm
      scales in full precision; a string is a regular expression searched in
      the leaf's path (``"layers/0/kernel"``); a callable gets ``(path, leaf)``.
      Leaves that are not floating (integer or bool) always get None.
    overrides: ``{path_regex: bits | QuantSpec | None}``, applied after
      ``include``; the first pattern that ``re.search``-matches a path wins. An
      int keeps the other defaults (a ``"ternary"`` default becomes
      ``"linear"`` at other widths), None keeps the leaf in full precision.
      A bits/QuantSpec override changes only leaves that ``include`` selects
      (so ``{"head": 8}`` gives ``head/kernel`` 8 bits and leaves
      ``head/bias`` in full precision); to quantize other leaves, widen
      ``include``. A pattern that matches no leaf, or (bits/QuantSpec) only
      leaves that ``include`` leaves out, is an error: it is almost always a
      typo.

  Raises:
    ValueError: an ``include`` regex or an override pattern that is not a
      valid regular expression or matches no
      parameter path; a per-channel spec on a leaf with fewer than 2 axes
      (it would give one scale per weight); a ``group_size`` that does not
      divide a quantized leaf's input axis. Each message names the pattern
      or path.

  Example::

    spec = quant_spec(params, bits=1, overrides={"conv_init": 8, "head": 8})
    # 4 bits, one scale per 64 inputs of each output channel; the head per channel:
    spec = quant_spec(params, bits=4, group_size=64,
                      overrides={"head": QuantSpec(8, per_channel=True)})
  """
  params = tree_lib.unwrap(params)
  default = QuantSpec(bits, scheme, per_channel, tol, max_iters, group_size)
  if include is None:
    include_fn = _default_include
  elif isinstance(include, str):
    pattern = _compile(include, "include")
    include_fn = lambda path, leaf: bool(pattern.search(path))
  elif callable(include):
    include_fn = include
  else:
    raise TypeError(f"quant_spec: include must be None, a regex or a callable, got {include!r}")
  if overrides is not None and not isinstance(overrides, Mapping):
    raise TypeError(f"quant_spec: overrides must be a dict {{path_regex: bits | QuantSpec | "
                    f"None}} or None, got {overrides!r}")

  compiled = []
  for pat, value in (overrides or {}).items():
    if not isinstance(pat, str):
      raise TypeError(f"quant_spec: override keys must be regex strings, got {pat!r}")
    if isinstance(value, bool) or not (value is None or isinstance(value, (int, QuantSpec))):
      raise TypeError(
          f"quant_spec: override {pat!r} must be bits (int), a QuantSpec or None, "
          f"got {value!r}")
    if isinstance(value, int):
      scheme_k = default.scheme
      if scheme_k == "ternary" and value != 2:
        scheme_k = "linear"
      if scheme_k == "log" and value < 2:
        scheme_k = "linear"
      value = QuantSpec(value, scheme_k, default.per_channel, default.tol, default.max_iters,
                        default.group_size)
    compiled.append((pat, _compile(pat, "overrides key"), value))
  used, matched, included_paths = set(), {}, []

  def leaf_spec(path, leaf):
    p = tree_lib.path_str(path)
    # Only floating leaves are quantized: an integer or bool leaf (a step
    # counter, a mask) keeps spec None whatever include and overrides say.
    dtype = getattr(leaf, "dtype", None)
    floating = dtype is not None and jnp.issubdtype(dtype, jnp.floating)
    included = floating and bool(include_fn(p, leaf))
    if included:
      included_paths.append(p)
    chosen = []
    for pat, rx, value in compiled:  # every pattern is checked, the first applicable wins
      if rx.search(p):
        matched.setdefault(pat, []).append(p)
        if value is None or included:
          used.add(pat)
          chosen.append(value)
    if chosen:
      return chosen[0]
    return default if included else None

  spec = jax.tree_util.tree_map_with_path(leaf_spec, params)
  _check_patterns(params, include, included_paths, compiled, used, matched)
  tree_lib.check_spec_matches(spec, params, "quant_spec")
  return spec


def _compile(pattern: str, what: str):
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"quant_spec: {what}={pattern!r} is not a valid regular expression "
                     f"({e}); escape special characters, e.g. re.escape(...)") from None


def _check_patterns(params, include, included_paths, compiled, used, matched) -> None:
  """One-line errors for an ``include`` regex or override that selects nothing."""
  paths = [tree_lib.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  if isinstance(include, str) and paths and not included_paths:
    raise ValueError(
        f"quant_spec: include={include!r} matches no parameter path, so nothing would "
        f"be quantized; paths are e.g. {paths[:6]}")
  for pat, _, _ in compiled:
    if pat in used:
      continue
    if pat in matched:
      raise ValueError(
          f"quant_spec: override {pat!r} matches only leaves that include= leaves in "
          f"full precision ({matched[pat][:4]}); bits/QuantSpec overrides apply to "
          "included leaves (ndim >= 2 by default), so widen include= to quantize these")
    raise ValueError(
        f"quant_spec: override pattern {pat!r} matches no parameter path; "
        f"paths are e.g. {paths[:6]}")


def quantize_params(params, spec, curvature=None, *, state=None):
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

  References:
    Hou, Yao & Kwok, "Loss-aware Binarization of Deep Networks", ICLR 2017.
    Hou & Kwok, "Loss-aware Weight Quantization of Deep Networks", ICLR 2018.

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
  tree_lib.check_spec_matches(spec, params, "quantize_params")
  if state is not None:
    scale = state_lib.find_field(state, "scale", "quantize_params")
    tree_lib.check_state_scales(spec, params, scale, "quantize_params")
    out = loss_aware.project(spec, params, scale)
  else:
    if curvature is not None:
      _check_curvature(spec, params, curvature)

    def fn(s, w, d=None):
      if s is None:
        return w
      return quantize(w, s, d)

    if curvature is None:
      out = tree_lib.map_with_spec(fn, spec, params)
    else:
      out = tree_lib.map_with_spec(fn, spec, params, curvature)
  _check_finite(spec, params)
  return tree_lib.map_with_spec(
      lambda s, q, w: q if s is None else jnp.where(jnp.isfinite(w), q, w), spec, out, params)


def _check_curvature(spec, params, curvature) -> None:
  """One-line errors for a curvature tree of another structure or with bad values."""
  spec_u = tree_lib.unwrap(spec)
  flat, treedef = jax.tree_util.tree_flatten_with_path(spec_u, is_leaf=tree_lib.is_spec_leaf)
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
                                                      is_leaf=tree_lib.is_spec_leaf)
  ws = treedef.flatten_up_to(tree_lib.unwrap(params))
  quantized = [(p, w) for (p, s), w in zip(flat, ws)
               if s is not None and w is not None and not tree_lib.is_masked(w)]
  if any(isinstance(w, jax.core.Tracer) or tree_lib.is_abstract(w) for _, w in quantized):
    return
  if not quantized or bool(loss_aware.all_finite([w for _, w in quantized])):
    return
  for path, w in quantized:
    if not bool(jnp.all(jnp.isfinite(w))):
      raise ValueError(f"quantize_params: latent weight {tree_lib.path_str(path)!r} has "
                       "NaN or inf entries; its quantized value would be meaningless. Restore "
                       "the last good checkpoint or lower the learning rate")
