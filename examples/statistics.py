"""Means, spreads and confidence intervals for the examples' tables (numpy; scipy
past 11 samples)."""

from __future__ import annotations

import numpy as np

# Two-sided 95% quantiles of Student's t for 1-10 degrees of freedom.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t_interval(diffs) -> tuple[float, float, float]:
  """``(mean, low, high)``: the 95% t-interval of the mean of paired differences."""
  d = np.asarray(diffs, float)
  mean = float(d.mean())
  if len(d) < 2:
    return mean, float("nan"), float("nan")
  if len(d) - 1 <= len(T975):
    t = T975[len(d) - 2]
  else:
    from scipy import stats
    t = float(stats.t.ppf(0.975, len(d) - 1))
  half = t * float(d.std(ddof=1)) / np.sqrt(len(d))
  return mean, mean - half, mean + half


def mean_std(xs, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
  """``"mean ± std"`` of ``xs`` times ``scale`` (the sample std, ``ddof=1``);
  one value alone is printed as it is."""
  xs = np.asarray(xs, float) * scale
  if len(xs) == 1:
    return fmt.format(xs[0])
  return f"{fmt.format(xs.mean())} ± {fmt.format(xs.std(ddof=1))}"
