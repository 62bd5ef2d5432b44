"""Tiny data sets in the real file formats, for the example tests (no download)."""

import numpy as np

from examples.classification import input_pipeline as ip


def write_fake_datasets(d, idx_names=("mnist",), sizes=(64, 20)):
  """IDX files for ``idx_names`` (``sizes`` = train, test) and CIFAR-10 batches
  under ``d``; learnable: the class sets the brightness."""
  rng = np.random.default_rng(0)

  def images(n, shape):
    y = rng.integers(0, 10, n)
    x = rng.integers(0, 40, (n, *shape)) + (y * 20).reshape(-1, *[1] * len(shape))
    return x.astype(np.uint8), y

  for name in idx_names:
    (d / name).mkdir()
    for n, prefix in zip(sizes, ("train", "t10k")):
      x, y = images(n, (28, 28))
      ip.write_idx(d / name / f"{prefix}-images-idx3-ubyte.gz", x)
      ip.write_idx(d / name / f"{prefix}-labels-idx1-ubyte.gz", y.astype(np.uint8))
  cifar = d / ip.CIFAR10_DIR
  cifar.mkdir()
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    x, y = images(8, (32, 32, 3))
    ip.write_cifar_batch(cifar / name, x, y)
  return d
