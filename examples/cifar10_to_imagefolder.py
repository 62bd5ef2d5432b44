"""Writes CIFAR-10 as an ImageFolder tree of PNG files for the ResNet18 example.

    python -m examples.cifar10_to_imagefolder --data-dir data/cifar10 \
        --out data/cifar10_imagefolder [--train-limit 5000 --val-limit 1000]

Reads ``cifar-10-batches-py`` (the canonical python batches, or what
``examples.cifar10_from_tfjs`` writes) and writes
``<out>/train/<class>/<index>.png`` (the 50,000 training images) and
``<out>/val/<class>/<index>.png`` (the 10,000 test images). The class
directories are CIFAR-10's names, whose sorted order is the label order, so
``examples.imagenet_resnet18.input_pipeline.find_classes`` gives label ``i`` to
class ``i``. PNG is lossless: the pipeline reads back the exact pixels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")


def write_split(images: np.ndarray, labels: np.ndarray, root, split: str,
                limit: int | None = None) -> int:
  """Writes ``images`` (``(n, 32, 32, 3)`` uint8) under ``root/split/<class>/``."""
  images, labels = np.asarray(images, np.uint8), np.asarray(labels)
  if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(labels):
    raise ValueError(f"write_split: expected (n, h, w, 3) images and n labels, got "
                     f"{images.shape} and {labels.shape}")
  if limit is not None:
    images, labels = images[:limit], labels[:limit]
  root = Path(root)
  for name in CLASSES:
    (root / split / name).mkdir(parents=True, exist_ok=True)
  for i, (image, label) in enumerate(zip(images, labels)):
    if not 0 <= int(label) < len(CLASSES):
      raise ValueError(f"write_split: label {label} of image {i} is not in 0..9")
    Image.fromarray(image).save(root / split / CLASSES[int(label)] / f"{i:05d}.png")
  return len(images)


def convert(data_dir, out, train_limit: int | None = None,
            val_limit: int | None = None) -> dict:
  from examples.classification import input_pipeline
  data = input_pipeline.load_cifar10(data_dir)
  return {"train": write_split(*data["train"], out, "train", train_limit),
          "val": write_split(*data["test"], out, "val", val_limit)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", required=True, help="holds cifar-10-batches-py")
  parser.add_argument("--out", required=True, help="root of the ImageFolder tree")
  parser.add_argument("--train-limit", type=int, default=None)
  parser.add_argument("--val-limit", type=int, default=None)
  args = parser.parse_args(argv)
  counts = convert(args.data_dir, args.out, args.train_limit, args.val_limit)
  print(f"wrote {counts['train']} train and {counts['val']} val images under {args.out}")


if __name__ == "__main__":
  main()
