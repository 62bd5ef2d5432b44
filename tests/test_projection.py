"""The projection against the best fixed point: a float64 reference run to convergence.

The reference (``benchmarks/projection.py``, numpy float64, its own rounding)
is, per scale group, the least error of three alternations run to
``|Δα| <= 1e-13 α``: from the weighted mean ``|w|``, from ``max|w|`` and from
the scale under test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blaq_jax as bq
from benchmarks import projection as ref
from blaq_jax._src import quantizers
from helpers import some_slow

WIDTHS = tuple(range(2, 9))


def kernels():
  rng = np.random.default_rng(3)
  dense = rng.normal(size=(96, 24)) * 0.05
  conv = rng.laplace(size=(3, 3, 8, 16)) * 0.05
  return [(dense, rng.uniform(0.1, 2.0, dense.shape)), (conv, rng.uniform(0.1, 2.0, conv.shape))]


@pytest.mark.parametrize("scheme,per_channel", some_slow(
    [("log", True), ("linear", False), ("log", False), ("linear", True)], fast={0}))
def test_cold_start_reaches_the_best_fixed_point(scheme, per_channel):
  for w, d in kernels():
    for bits in WIDTHS:
      spec = bq.QuantSpec(bits, scheme=scheme, per_channel=per_channel)
      alpha = bq.fit_scale(jnp.asarray(w, jnp.float32), spec, jnp.asarray(d, jnp.float32))
      ratios = ref.error_ratios(w, d, spec, alpha)
      assert ratios.max() <= 1.001, (bits, w.shape, ratios.max())
      # quantize() is the same cold start.
      q = np.asarray(bq.quantize(jnp.asarray(w, jnp.float32), spec, jnp.asarray(d, jnp.float32)),
                     np.float64)
      assert float(np.sum(d * (w - q) ** 2)) <= float(np.sum(ref.best_fixed_point_error(
          w, d, spec, alpha))) * 1.001


def test_reference_rounding_matches_the_library(x64):
  rng = np.random.default_rng(0)
  x = rng.normal(size=4000) * 0.7
  for spec in (bq.QuantSpec(3), bq.QuantSpec(5, scheme="log"), bq.QuantSpec(8, scheme="log"),
               bq.QuantSpec(2)):
    np.testing.assert_array_equal(ref.nearest_code_np(x, spec),
                                  np.asarray(quantizers.nearest_code(jnp.asarray(x), spec)))


@pytest.mark.parametrize("rows", [quantizers.SUM_ROWS, quantizers.SUM_ROWS_LOG, 3])
def test_group_sums_equal_plain_sums(x64, rows):
  rng = np.random.default_rng(1)
  # Five sums: more than one reduction's worth (SUM_OUTPUTS).
  for shape in [(7,), (96, 24), (3, 3, 5, 16), (30, 1), (64, 40)]:
    xs = [rng.normal(size=shape) for _ in range(5)]
    for per_channel in (False, True):
      axes = ref.group_axes(len(shape), per_channel)
      got = quantizers.group_sums(tuple(map(jnp.asarray, xs)), per_channel, rows)
      assert len(got) == len(xs)
      for g, x in zip(got, xs, strict=True):
        np.testing.assert_allclose(g, np.sum(x, axis=axes, keepdims=True), rtol=1e-12)
  # The grouped view (..., in // g, g, out): sums over axis -2.
  view = rng.normal(size=(2, 3, 24, 5))
  got = quantizers.group_sums((jnp.asarray(view),) * 4, quantizers.GROUP, rows)
  for g in got:
    np.testing.assert_allclose(g, np.sum(view, axis=-2, keepdims=True), rtol=1e-12)


def test_warm_start_costs_a_fixed_number_of_rounds():
  w = jax.random.normal(jax.random.key(0), (64, 32)) * 0.05
  for bits in (2, 4, 8):
    spec = bq.QuantSpec(bits)
    cold = bq.fit_scale(w, spec)
    alpha, rounds = bq.fit_scale(w, spec, None, 0.6 * cold, with_rounds=True)
    assert int(rounds) == 1
    # From a warm start 40% too small (within the search's factor 2) it finds the basin.
    assert ref.error_ratios(np.asarray(w, np.float64), np.ones(w.shape), spec, alpha)[0] < 1.01


def test_warm_fit_cost_counts_the_search_and_the_passes():
  # 784x2048 per tensor at 2 bits: 1/256 sampled (6272 of 1,605,632 weights,
  # at least 16384), 4 levels x 9 candidates, then one round.
  size = 784 * 2048
  stride = -(-size // 16384)
  expected = 36 * (-(-size // stride)) / size + 1.0
  assert bq.warm_fit_cost((784, 2048), bq.QuantSpec(2)) == pytest.approx(expected)
  # From 4 bits: + refinement (3), max|w| (1), three-candidate round (3).
  assert bq.warm_fit_cost((784, 2048), bq.QuantSpec(4)) == pytest.approx(expected + 6.0)
  assert bq.warm_fit_cost((3, 3, 8, 16), bq.QuantSpec(1)) == 1.0
  # A small leaf is sampled whole: every candidate visits every weight.
  assert bq.warm_fit_cost((64, 32), bq.QuantSpec(2)) == pytest.approx(37.0)
