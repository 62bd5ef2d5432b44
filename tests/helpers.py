"""Helpers shared by the tests."""

import chex
import jax
import numpy as np
import pytest

# Tests marked slow run in `make test-all`, not in `make test` (CI): each one
# covers a case that a faster test of the same property already covers once.
slow = pytest.mark.slow


def some_slow(values, fast):
  """Parametrize ``values``, all but those at the indices in ``fast`` marked slow.

  A tuple value is unpacked into several arguments.
  """
  out = []
  for i, v in enumerate(values):
    args = v if isinstance(v, tuple) else (v,)
    out.append(pytest.param(*args, marks=() if i in fast else slow))
  return out


def max_abs_diff(a, b) -> float:
  """The largest ``|a - b|`` over two trees of one structure (checked)."""
  chex.assert_trees_all_equal_structs(a, b)
  return max((float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))), default=0.0)


def as_bits(tree):
  """Each leaf's bytes as unsigned integers (so -0.0 and 0.0 differ, as do NaN payloads)."""
  return jax.tree.map(lambda x: np.asarray(x).view(f"u{np.asarray(x).dtype.itemsize}"), tree)


def assert_bits_equal(a, b):
  """Same structure, shapes and dtypes, and the same bytes in every leaf."""
  chex.assert_trees_all_equal_shapes_and_dtypes(a, b)
  chex.assert_trees_all_equal(as_bits(a), as_bits(b))
