"""The projection Q_D(w) against brute force over every code assignment."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blaq_jax as bq
from blaq_jax._src import quantizers


def brute_force(w, d, codebook):
  """Global optimum of sum d (w - alpha b)^2 over b in C^n, alpha > 0."""
  best = (np.inf, None, None)
  for b in itertools.product(codebook, repeat=w.size):
    b = np.asarray(b)
    den = np.sum(d * b * b)
    if den == 0:
      continue
    alpha = np.sum(d * b * w) / den
    if alpha <= 0:
      continue
    obj = np.sum(d * (w - alpha * b) ** 2)
    if obj < best[0]:
      best = (obj, alpha, b)
  return best


def objective(w, d, q):
  return float(np.sum(d * (w - q) ** 2))


def one_round(w, d, spec, alpha):
  """One more alternation round from a given alpha, in float64 numpy."""
  b = np.asarray(quantizers.nearest_code(jnp.asarray(w / alpha), spec), np.float64)
  return np.sum(d * b * w) / np.sum(d * b * b), b


def test_codebooks():
  assert list(bq.QuantSpec(1).codebook()) == [-1, 1]
  assert list(bq.QuantSpec(2, scheme="ternary").codebook()) == [-1, 0, 1]
  assert list(bq.QuantSpec(2).codebook()) == [-1, 0, 1]
  np.testing.assert_array_equal(bq.QuantSpec(3).codebook(), np.arange(-3, 4) / 3)
  np.testing.assert_array_equal(
      bq.QuantSpec(3, scheme="log").codebook(), [-1, -.5, -.25, 0, .25, .5, 1])
  assert bq.QuantSpec(8).codebook().size == 255
  assert bq.QuantSpec(4, scheme="log").codebook().size == 15


@pytest.mark.parametrize("seed", range(20))
def test_binary_matches_brute_force_exactly(seed, x64):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=6)
  d = rng.uniform(0.1, 3.0, size=6)
  obj, alpha, b = brute_force(w, d, [-1.0, 1.0])
  a_, b_ = quantizers.solve(jnp.asarray(w), bq.QuantSpec(1), jnp.asarray(d))
  np.testing.assert_array_equal(np.asarray(b_), b)
  np.testing.assert_allclose(float(a_.squeeze()), alpha, rtol=1e-12)


@pytest.mark.parametrize("spec", [
    bq.QuantSpec(2, scheme="ternary", ),
    bq.QuantSpec(2, ),
    bq.QuantSpec(3, ),
    bq.QuantSpec(2, scheme="log", ),
    bq.QuantSpec(3, scheme="log", ),
], ids=lambda s: f"{s.bits}b-{s.scheme}")
@pytest.mark.parametrize("seed", range(8))
def test_alternation_fixed_point_and_quality(spec, seed, x64):
  rng = np.random.default_rng(100 + seed)
  w = rng.normal(size=5) * rng.uniform(0.2, 2.0)
  d = rng.uniform(0.1, 3.0, size=5)
  alpha, b = quantizers.solve(jnp.asarray(w), spec, jnp.asarray(d))
  alpha = float(alpha.squeeze())
  np.testing.assert_array_equal(alpha * np.asarray(b),
                                bq.quantize(jnp.asarray(w), spec, jnp.asarray(d)))
  b = np.asarray(b)
  q = alpha * b
  # A fixed point: one more round changes neither b nor alpha.
  alpha2, b2 = one_round(w, d, spec, alpha)
  np.testing.assert_array_equal(b2, b)
  np.testing.assert_allclose(alpha2, alpha, rtol=1e-12)
  # No worse than plain rounding at the initial scale (with its best alpha).
  alpha0 = np.sum(d * np.abs(w)) / np.sum(d)
  a_r, b_r = one_round(w, d, spec, alpha0)
  assert objective(w, d, q) <= objective(w, d, a_r * b_r) + 1e-12
  # And never better than the global optimum (sanity of the brute force).
  best, _, _ = brute_force(w, d, spec.codebook())
  assert objective(w, d, q) >= best - 1e-12
  # Codes come from the code set.
  assert set(np.round(b, 12)).issubset(set(np.round(spec.codebook(), 12)))


def test_alternation_usually_finds_global_optimum(x64):
  # Not guaranteed, but on random tiny problems the fixed point is mostly
  # the brute-force optimum; a regression here means the solver got worse.
  hits = 0
  spec = bq.QuantSpec(2)
  for seed in range(30):
    rng = np.random.default_rng(seed)
    w, d = rng.normal(size=5), rng.uniform(0.1, 3.0, size=5)
    q = np.asarray(bq.quantize(jnp.asarray(w), spec, jnp.asarray(d)))
    best, _, _ = brute_force(w, d, spec.codebook())
    hits += objective(w, d, q) <= best + 1e-12
  assert hits >= 24


def test_curvature_matters():
  w = jnp.array([1.0, -0.1, 0.5, -2.0])
  plain = bq.quantize(w, bq.QuantSpec(1))
  weighted = bq.quantize(w, bq.QuantSpec(1), jnp.array([10.0, 1.0, 1.0, 1.0]))
  np.testing.assert_allclose(plain, 0.9 * np.sign(w), rtol=1e-6)
  np.testing.assert_allclose(weighted, (10 + 0.1 + 0.5 + 2) / 13 * np.sign(w), rtol=1e-6)


def test_per_channel_scales_are_independent():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
  d = jnp.asarray(rng.uniform(0.5, 2, size=(3, 4, 5)), jnp.float32)
  for spec in [bq.QuantSpec(1, per_channel=True), bq.QuantSpec(3, per_channel=True)]:
    q = bq.quantize(w, spec, d)
    per_tensor = dataclasses.replace(spec, per_channel=False)
    for c in range(5):
      np.testing.assert_allclose(q[..., c], bq.quantize(w[..., c], per_tensor, d[..., c]),
                                 rtol=1e-6)


def test_log_codes_are_nearest_in_value():
  spec = bq.QuantSpec(4, scheme="log")  # {0, +-2^-j, j = 0..6}
  book = spec.codebook()
  x = np.linspace(-1.3, 1.3, 2001, dtype=np.float32)
  got = np.asarray(quantizers.nearest_code(jnp.asarray(x), spec))
  dist = np.abs(x[:, None] - book[None, :])
  best = dist.min(axis=1)
  np.testing.assert_allclose(np.abs(x - got), best, atol=1e-7)


def test_zeros_and_dtypes():
  z = jnp.zeros((3, 3))
  for spec in [bq.QuantSpec(1), bq.QuantSpec(2), bq.QuantSpec(3, scheme="log")]:
    np.testing.assert_array_equal(bq.quantize(z, spec), z)
  wb = jnp.ones((4, 4), jnp.bfloat16)
  assert bq.quantize(wb, bq.QuantSpec(2)).dtype == jnp.bfloat16


def test_quantize_jits_for_every_width():
  w = jax.random.normal(jax.random.key(0), (16, 8))
  specs = [bq.QuantSpec(bits, scheme=scheme) for bits in range(1, 9)
           for scheme in (["linear", "log"] if bits > 1 else ["linear"])]
  outs = jax.jit(lambda w: [bq.quantize(w, s) for s in specs])(w)
  for spec, q in zip(specs, outs):
    alpha = jnp.max(jnp.abs(q))
    levels = np.unique(np.asarray(q / alpha))
    gap = np.abs(levels[:, None] - spec.codebook()[None, :]).min(axis=1)
    assert gap.max() < 1e-5, spec
    assert len(levels) <= 2 ** spec.bits


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(bits=0), ValueError, "bits"),
    (dict(bits=9), ValueError, "bits"),
    (dict(bits=2.0), TypeError, "bits"),
    (dict(bits=2, scheme="uniform"), ValueError, "scheme"),
    (dict(bits=3, scheme="ternary"), ValueError, "ternary"),
    (dict(bits=1, scheme="log"), ValueError, "log"),
    (dict(bits=2, max_iters=0), ValueError, "max_iters"),
    (dict(bits=2, max_iters=2.5), TypeError, "max_iters"),
    (dict(bits=2, tol=-1e-3), ValueError, "tol"),
    (dict(bits=2, tol=1.0), ValueError, "tol"),
])
def test_bad_spec(kwargs, err, match):
  with pytest.raises(err, match=match):
    bq.QuantSpec(**kwargs)


def test_quantize_rejects_integer_arrays():
  with pytest.raises(TypeError, match="floating"):
    bq.quantize(jnp.ones((2, 2), jnp.int32), bq.QuantSpec(1))


# ------------------------------------ convergence against a float64 reference

def np_alternation(w, d, spec, axes, alpha, tol=1e-13, max_rounds=100_000):
  """The alpha/b alternation in float64 numpy, run to convergence from alpha."""
  book = spec.codebook()

  def codes(alpha):
    x = w / alpha
    return book[np.abs(x[..., None] - book).argmin(-1)]

  for _ in range(max_rounds):
    b = codes(alpha)
    new = np.sum(d * b * w, axis=axes, keepdims=True) / np.sum(d * b * b, axis=axes,
                                                                keepdims=True)
    done = np.all(np.abs(new - alpha) <= tol * new)
    alpha = new
    if done:
      break
  return np.sum(d * (w - alpha * codes(alpha)) ** 2)


ALL_WIDTHS = [bq.QuantSpec(bits, scheme=scheme, per_channel=pc)
              for bits in range(2, 9) for scheme in ("linear", "log") for pc in (False, True)]


@pytest.mark.parametrize("spec", ALL_WIDTHS,
                         ids=lambda s: f"{s.bits}b-{s.scheme}-{'pc' if s.per_channel else 'pt'}")
def test_projection_reaches_the_converged_fixed_point(spec):
  """float32 bq.quantize is within 1e-3 of the float64 alternation run to
  convergence, both from the old start sum(D|w|)/sum(D) and from its own scale."""
  rng = np.random.default_rng(spec.bits)
  w = rng.normal(size=(120, 6)) * 0.05
  d = rng.uniform(0.1, 2.0, size=w.shape)
  axes = (0,) if spec.per_channel else (0, 1)
  q = np.asarray(bq.quantize(jnp.asarray(w, jnp.float32), spec,
                             jnp.asarray(d, jnp.float32)), np.float64)
  err = np.sum(d * (w - q) ** 2)
  start = np.sum(d * np.abs(w), axis=axes, keepdims=True) / np.sum(d, axis=axes, keepdims=True)
  assert err <= np_alternation(w, d, spec, axes, start) * (1 + 1e-3)
  own = np.asarray(quantizers.fit_scale(jnp.asarray(w), spec, jnp.asarray(d)), np.float64)
  converged = np_alternation(w, d, spec, axes, own)
  assert abs(err - converged) <= 1e-3 * converged


@pytest.mark.parametrize("spec,slack", [
    (bq.QuantSpec(2), 1e-3), (bq.QuantSpec(3), 1e-3), (bq.QuantSpec(4), 1e-3),
    (bq.QuantSpec(4, scheme="log", per_channel=True), 1e-3),
    # At 8 bits nearly every scale above the clipping point is a fixed point
    # of the alternation (it cannot see the rounding error shrink with alpha),
    # so a warm start keeps the one it is at: measured 5% above the cold
    # start's error after this drift.
    (bq.QuantSpec(8), 0.1)], ids=lambda s: f"{s.bits}b-{s.scheme}" if hasattr(s, "bits") else "")
def test_warm_start_on_moving_weights_ends_at_the_cold_fixed_point(spec, slack):
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(size=(200, 4)) * 0.05, jnp.float32)
  d = jnp.asarray(rng.uniform(0.1, 2.0, size=w.shape), jnp.float32)
  drift = jnp.asarray(rng.normal(size=w.shape) * 2e-5, jnp.float32)
  fit = jax.jit(lambda w, a: quantizers.fit_scale(w, spec, d, a, with_rounds=True))
  alpha = quantizers.fit_scale(w, spec, d)
  rounds = []
  for _ in range(30):
    w = w + drift
    alpha, r = fit(w, alpha)
    rounds.append(int(r))

  def err(q):
    return float(jnp.sum(d * (w - q) ** 2))

  warm = err(quantizers.quantize_with_scale(w, spec, alpha))
  cold = err(bq.quantize(w, spec, d))
  assert warm <= cold * (1 + slack)
  # a warm start converges in a round or two
  assert np.mean(rounds) <= 3 if spec.bits < 8 else 8, rounds


def test_bad_warm_start_starts_from_the_mean():
  """Zeros (an abstract init) or non-finite scales restart the alternation
  from sum(D|w|)/sum(D) and still end at a fixed point near the cold one."""
  w = jax.random.normal(jax.random.key(0), (32, 4)) * 0.1
  spec = bq.QuantSpec(3)
  err = lambda a: float(jnp.sum((w - quantizers.quantize_with_scale(w, spec, a)) ** 2))
  cold = quantizers.fit_scale(w, spec)
  for bad in (0.0, -1.0, jnp.nan, jnp.inf):
    alpha = quantizers.fit_scale(w, spec, None, jnp.full((1, 1), bad))
    assert float(alpha[0, 0]) > 0
    again = quantizers.fit_scale(w, spec, None, alpha)
    np.testing.assert_allclose(again, alpha, rtol=1e-6)  # a fixed point
    assert err(alpha) <= err(cold) * 1.05


def test_no_gradient_through_the_scale():
  w = jnp.array([0.3, -0.2, 0.05, 0.7])
  spec = bq.QuantSpec(3)
  g = jax.grad(lambda w: jnp.sum(bq.quantize(w, spec)))(w)
  np.testing.assert_array_equal(g, 0)  # codes are piecewise constant, alpha is fixed


@pytest.mark.parametrize("spec", [bq.QuantSpec(1), bq.QuantSpec(2),
                                  bq.QuantSpec(2, scheme="ternary"),
                                  bq.QuantSpec(3), bq.QuantSpec(3, scheme="log"),
                                  bq.QuantSpec(8), bq.QuantSpec(8, scheme="log")])
def test_code_index_is_the_position_in_the_codebook(spec):
  book = spec.codebook()
  idx = quantizers.code_index(jnp.asarray(book, jnp.float32), spec)
  np.testing.assert_array_equal(idx, np.arange(len(book)))
  if not spec.is_binary:  # -0.0 (which rounding produces) is the code 0
    assert book[int(quantizers.code_index(jnp.asarray(-0.0), spec))] == 0
  w = jax.random.normal(jax.random.key(0), (64,)) * 0.3
  _, b = quantizers.scale_and_codes(w, spec)
  np.testing.assert_allclose(book[quantizers.integer_codes(w, spec)], b, rtol=1e-6)
