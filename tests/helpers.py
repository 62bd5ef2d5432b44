"""Helpers shared by the tests."""

import os
import socket
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

# Tests marked slow run in `make test-all`, not in `make test` (CI): each one
# covers a case that a faster test of the same property already covers once.
slow = pytest.mark.slow
# Trains an example, runs a benchmark or starts other processes: left out of
# `make test-fast`. A module marks itself with `pytestmark = end_to_end`.
end_to_end = pytest.mark.end_to_end
# Trains on the 8 simulated devices (pmap, sharded jit, FSDP): also left out of
# `make test-fast`.
multi_device = pytest.mark.multi_device
# A bit-for-bit equality between two differently built graphs: `make test`
# runs these at XLA's default optimization level, as users compile.
bit_exact = pytest.mark.bit_exact


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


# The head of a jax.distributed worker script: 4 CPU devices per process,
# gloo collectives, then `pid, out = ...` and the tests directory importable.
WORKER_HEAD = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize("127.0.0.1:" + port, num_processes=2, process_id=pid)
jax.config.update("jax_enable_x64", True)
sys.path.insert(0, {tests_dir!r})
"""


def run_two_processes(body: str, tmp_path) -> None:
  """Runs ``WORKER_HEAD + body`` as process 0 and 1 of a localhost
  ``jax.distributed`` job (writing into ``tmp_path``); fails with a worker's output."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  script = tmp_path / "worker.py"
  script.write_text(WORKER_HEAD.format(tests_dir=os.path.dirname(__file__)) + body)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, str(script), str(i), port, str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  try:
    for proc in procs:
      out, _ = proc.communicate(timeout=900)
      assert proc.returncode == 0, out.decode()[-3000:]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
