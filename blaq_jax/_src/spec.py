"""Quantization specs: how each array is quantized, and the spec tree of a model.

A :class:`QuantSpec` describes the projection of one array (its code set and
how its scales are grouped); :func:`quant_spec` builds the spec tree of a
parameter pytree (a QuantSpec or None per leaf). The helpers here map over a
spec tree alongside trees like params and check that a spec tree fits them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

from blaq_jax._src import checks
from blaq_jax._src import tree as tree_lib

SCHEMES = ("linear", "log", "ternary")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How one array is quantized.

  Examples:
    >>> import jax.numpy as jnp
    >>> import blaq_jax as bq
    >>> bq.QuantSpec(2, scheme="ternary").codebook()
    array([-1.,  0.,  1.])
    >>> bq.QuantSpec(3, scheme="log").codebook()
    array([-1.  , -0.5 , -0.25,  0.  ,  0.25,  0.5 ,  1.  ])
    >>> spec = bq.QuantSpec(4, group_size=64)  # one scale per 64 inputs of each output
    >>> bq.fit_scale(jnp.ones((512, 256)), spec).shape
    (8, 256)

  Attributes:
    bits: 1 to 8. ``bits=1`` is binary (scheme ``"linear"``).
    scheme: ``"linear"`` (uniform codes), ``"log"`` (powers of two, ``bits >=
      2``) or ``"ternary"`` (``{-1, 0, 1}``, requires ``bits=2``).
    per_channel: one scale per output channel (last axis) instead of one per
      tensor.
    tol: the cold start's alternations stop when ``|Δalpha| <= tol · alpha``
      for every scale (relative; the paper's Algorithm 2 uses ``1e-6``). A
      training step's warm start does a fixed amount of work instead.
    max_iters: the most rounds of each cold-start alternation (a safety cap).
    group_size: ``g`` for group-wise scales, or None. One scale per group of
      ``g`` consecutive weights along the input axis (axis -2: ``in`` of a
      dense kernel ``(in, out)``, ``c_in`` of a conv kernel ``(h, w, c_in,
      c_out)``), per output channel (and per spatial position): the scale
      has the leaf's shape with axis -2 divided by ``g``. ``g`` must divide
      that axis, and the leaf needs at least 2 axes. It implies scales per
      output channel, whatever ``per_channel`` says.

  Neither ``tol`` nor ``max_iters`` is the BLAQ paper's ``m``.
  """

  bits: int
  _: dataclasses.KW_ONLY
  scheme: str = "linear"
  per_channel: bool = False
  tol: float = 1e-6
  max_iters: int = 50
  group_size: int | None = None

  def __post_init__(self):
    if not checks.is_concrete_number(self.bits, integer=True):
      raise TypeError(f"QuantSpec: bits must be an int in 1..8, got {self.bits!r}")
    if not 1 <= int(self.bits) <= 8:
      raise ValueError(f"QuantSpec: bits must be in 1..8, got {self.bits}")
    if not isinstance(self.scheme, str) or self.scheme not in SCHEMES:
      raise ValueError(
          f"QuantSpec: unknown scheme {self.scheme!r}; expected one of {SCHEMES}")
    if self.scheme == "ternary" and self.bits != 2:
      raise ValueError(f"QuantSpec: scheme 'ternary' needs bits=2, got {self.bits}")
    if self.scheme == "log" and self.bits < 2:
      raise ValueError("QuantSpec: scheme 'log' needs bits >= 2 (1 bit is binary)")
    checks.boolean("QuantSpec", "per_channel", self.per_channel)
    if not checks.is_concrete_number(self.max_iters, integer=True):
      raise TypeError(f"QuantSpec: max_iters must be an int >= 1, got {self.max_iters!r}")
    if self.max_iters < 1:
      raise ValueError(f"QuantSpec: max_iters must be >= 1, got {self.max_iters}")
    if not checks.is_concrete_number(self.tol):
      raise TypeError(f"QuantSpec: tol must be a float in [0, 1), got {self.tol!r}")
    if not 0 <= self.tol < 1:
      raise ValueError(f"QuantSpec: tol must be a float in [0, 1), got {self.tol!r}")
    g = self.group_size
    if g is not None and not checks.is_concrete_number(g, integer=True):
      raise TypeError(f"QuantSpec: group_size must be None or an int >= 1, got {g!r}")
    if g is not None and g < 1:
      raise ValueError(f"QuantSpec: group_size must be None or an int >= 1, got {g}")

  @property
  def is_binary(self) -> bool:
    return self.bits == 1

  @property
  def levels(self) -> int:
    """``n`` of the linear code set (codes are multiples of ``1/n``)."""
    return 2 ** (self.bits - 1) - 1

  @property
  def log_depth(self) -> int:
    """``J`` of the log code set (smallest non-zero magnitude ``2^-J``)."""
    return 2 ** (self.bits - 1) - 2

  def codebook(self) -> np.ndarray:
    """All code values, sorted ascending (float64)."""
    if self.is_binary:
      return np.array([-1.0, 1.0])
    if self.scheme == "log":
      mags = 2.0 ** -np.arange(self.log_depth + 1, dtype=np.float64)
      return np.concatenate([-mags, [0.0], mags[::-1]])
    n = self.levels
    return np.arange(-n, n + 1, dtype=np.float64) / n


def check_group_shape(shape, spec: QuantSpec, name: str = "the leaf") -> None:
  """A one-line ValueError unless ``spec.group_size`` divides axis -2 of ``shape``."""
  g = spec.group_size
  if g is None:
    return
  shape = tuple(shape)
  if len(shape) < 2:
    raise ValueError(
        f"group_size={g} needs a kernel with an input axis (axis -2), but {name} has shape "
        f"{shape}; quantize it per tensor (group_size=None) or leave it in full precision")
  if shape[-2] % g:
    raise ValueError(
        f"group_size={g} does not divide the input axis (axis -2, size {shape[-2]}) of "
        f"{name} of shape {shape}; use a group size that divides {shape[-2]}, or override "
        "this leaf in quant_spec (another QuantSpec, or None)")


# --- spec trees ---------------------------------------------------------------

# A spec tree: a pytree like the params (dicts, lists, tuples, NamedTuples, a
# Flax NNX State) with a QuantSpec or None (full precision) per leaf, as
# quant_spec builds it.
QuantSpecTree: TypeAlias = (
    QuantSpec | None | Mapping[Any, "QuantSpecTree"] | Sequence["QuantSpecTree"])


def is_spec_leaf(x) -> bool:
  return x is None or isinstance(x, QuantSpec)


def map_with_spec(fn: Callable[..., Any], spec, *trees):
  """``fn(spec_leaf, *subtrees)`` over the leaves of ``spec`` (None included).

  NNX Variables in ``spec`` and ``trees`` are unwrapped for ``fn``, and put
  back around the results where the first tree had them. Subtrees that are
  ``optax.MaskedNode`` (leaves masked out by ``optax.masked`` /
  ``optax.multi_transform``) and params leaves that are None pass through
  unchanged. If the first tree is optax's ``map_params``
  placeholder, it is returned as it is (the state field is "like params").
  """
  if trees and tree_lib.is_params_placeholder(trees[0]):
    return trees[0]
  spec = tree_lib.unwrap(spec)
  pure = tuple(tree_lib.unwrap(t) for t in trees)

  def leaf_fn(s, first, *rest):
    if first is None or tree_lib.is_masked(first):
      return first
    return fn(s, first, *rest)

  result = jax.tree.map(leaf_fn, spec, *pure, is_leaf=is_spec_leaf)
  if trees and pure[0] is not trees[0]:
    result = tree_lib.rewrap(trees[0], result)
  return result


def map_quantized(fn: Callable[..., Any], spec, *trees):
  """``fn(spec_leaf, *leaves)`` at the quantized leaves (spec not None), None
  at the others; the trees are unwrapped first, so the result is a pure tree
  (as an optimizer state is), whatever NNX Variables the inputs hold."""
  trees = tuple(tree_lib.unwrap(t) for t in trees)
  return map_with_spec(lambda s, *xs: None if s is None else fn(s, *xs), spec, *trees)


def check_spec_arg(spec, where: str, *, params=None) -> None:
  """Rejects a ``spec`` of None, or a bare QuantSpec given for a tree of params."""
  single = params is not None and len(jax.tree.leaves(params)) == 1 and \
      jax.tree_util.treedef_is_leaf(jax.tree.structure(params))
  if spec is None or (isinstance(spec, QuantSpec) and params is not None and not single):
    what = "None" if spec is None else "a bare QuantSpec"
    raise TypeError(
        f"{where}: spec is {what}; pass a tree like params with a QuantSpec or None "
        "per leaf, e.g. spec = blaq_jax.quant_spec(params, bits=1)")


def check_spec_matches(spec, params, where: str) -> None:
  """Raises a one-line ValueError/TypeError naming ``where`` and the bad path.

  Checks that ``spec`` is a tree like ``params`` (NNX Variables unwrapped)
  with a :class:`QuantSpec` or None per leaf, that no per-channel spec
  sits on a leaf with fewer than 2 axes, and that a spec's ``group_size``
  divides its leaf's input axis (axis -2). optax's ``map_params`` placeholder
  passes.
  """
  if tree_lib.is_params_placeholder(params):
    return
  spec, params = tree_lib.unwrap(spec), tree_lib.unwrap(params)
  check_spec_arg(spec, where, params=params)
  try:
    jax.tree.map(lambda s, p: None, spec, params, is_leaf=is_spec_leaf)
  except (ValueError, TypeError) as e:
    spec_paths = set(tree_lib.leaf_paths(spec, is_spec_leaf))
    param_paths = set(tree_lib.leaf_paths(params))
    only_p = sorted(param_paths - spec_paths)[:5]
    only_s = sorted(spec_paths - param_paths)[:5]
    detail = " ".join(str(e).split())[:200]
    raise ValueError(
        f"{where}: the spec tree does not match the params tree "
        f"(paths only in params: {only_p}; only in spec: {only_s}); "
        f"build the spec with blaq_jax.quant_spec(params, ...) from these params "
        f"[{detail}]") from None
  bad = []
  for path, s in jax.tree_util.tree_flatten_with_path(spec, is_leaf=is_spec_leaf)[0]:
    if not is_spec_leaf(s):
      bad.append(tree_lib.path_str(path))
  if bad:
    raise TypeError(
        f"{where}: spec leaves must be QuantSpec or None; bad at {bad[:5]}; "
        "build the spec with blaq_jax.quant_spec(params, ...)")

  def per_channel_check(path, s, w):
    if not isinstance(s, QuantSpec) or w is None or tree_lib.is_masked(w):
      return
    if s.group_size is not None:
      try:
        check_group_shape(jnp.shape(w), s, repr(tree_lib.path_str(path)))
      except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    elif s.per_channel and jnp.ndim(w) < 2:
      raise ValueError(
          f"{where}: per_channel spec on {tree_lib.path_str(path)!r} of shape {jnp.shape(w)} would "
          "give one scale per weight; quantize it per tensor (per_channel=False) or "
          "leave it in full precision")

  jax.tree_util.tree_map_with_path(per_channel_check, spec, params, is_leaf=is_spec_leaf)


# --- building a spec tree -------------------------------------------------------


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
) -> QuantSpecTree:
  """Returns a pytree like ``params`` with a :class:`QuantSpec` or None per leaf.

  Each selected leaf gets the code set ``C`` of its :class:`QuantSpec`::

      bits=1                   C = {-1, +1}
      bits=k, "linear"         C = {-1, ..., -1/n, 0, 1/n, ..., 1},  n = 2^(k-1) - 1
      bits=2, "ternary"        C = {-1, 0, +1}
      bits=k, "log"            C = {0} ∪ {±2^-j : j = 0 .. 2^(k-1) - 2}

  and the projection ``Q_D(w) = α · b``, ``(α, b) = argmin Σ D (w - α b)²``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import blaq_jax as bq
    >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
    ...           "head": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    >>> spec = bq.quant_spec(params, bits=2, overrides={"head": 8})
    >>> jax.tree.map(lambda s: s.bits, spec)
    {'dense': {'bias': None, 'kernel': 2}, 'head': {'bias': None, 'kernel': 8}}
    >>> spec["head"]["kernel"]
    QuantSpec(bits=8, scheme='linear', per_channel=False, tol=1e-06, max_iters=50, group_size=None)
    >>> spec = bq.quant_spec(params, bits=4, group_size=2,
    ...                      overrides={"head": bq.QuantSpec(8, per_channel=True)})
    >>> spec["dense"]["kernel"].group_size, spec["head"]["kernel"].per_channel
    (2, True)

  References:
    Hou & Kwok, `Loss-aware Weight Quantization of Deep Networks
    <https://arxiv.org/abs/1802.08635>`_, ICLR 2018 (linear and logarithmic code
    sets).
    Li, Zhang & Liu, `Ternary Weight Networks <https://arxiv.org/abs/1605.04711>`_,
    2016.

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
  """
  params = tree_lib.unwrap(params)
  default = QuantSpec(bits, scheme=scheme, per_channel=per_channel, tol=tol,
                      max_iters=max_iters, group_size=group_size)
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
    if not (value is None or isinstance(value, QuantSpec)
            or checks.is_concrete_number(value, integer=True)):
      raise TypeError(
          f"quant_spec: override {pat!r} must be bits (int), a QuantSpec or None, "
          f"got {value!r}")
    if not (value is None or isinstance(value, QuantSpec)):  # bits
      scheme_k = default.scheme
      if scheme_k == "ternary" and value != 2:
        scheme_k = "linear"
      if scheme_k == "log" and value < 2:
        scheme_k = "linear"
      value = dataclasses.replace(default, bits=value, scheme=scheme_k)
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
  check_spec_matches(spec, params, "quant_spec")
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
