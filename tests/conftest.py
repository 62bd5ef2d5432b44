"""Test set-up: 8 simulated CPU devices for the data-parallel tests, and a
compilation cache shared by the test processes."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

# XLA's persistent compilation cache: a test that compiles a graph another test
# (or an earlier run) already compiled loads it. Keys hold the graph, the XLA
# flags and the versions, so a changed graph is compiled again (`make clean`
# empties it).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402


@pytest.fixture
def x64():
  """Runs a test with float64 enabled (and restores the setting after)."""
  with jax.enable_x64(True):
    yield
