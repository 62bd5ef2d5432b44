"""ImageNet input pipeline with grain over an ImageFolder tree.

``<data_dir>/train/<class>/*.JPEG`` and ``<data_dir>/val/<class>/*.JPEG``; the
classes are the sorted sub-directory names of ``train``. Each process reads
only its own shard of the files (``jax.process_index()`` of
``jax.process_count()``). Training: random-resized crop (scale 0.08-1, aspect
3/4-4/3) and a horizontal flip; evaluation: resize the short side to
``resize_size`` and take the centre ``image_size`` crop. Batches are
``{"image": uint8 [B, S, S, 3], "label": int32 [B]}`` with ``B`` the
per-process batch; the model normalizes on the device.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence

import grain
import jax
import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def find_classes(data_dir: str) -> list[str]:
  train_dir = os.path.join(data_dir, "train")
  if not os.path.isdir(train_dir):
    raise FileNotFoundError(
        f"no ImageFolder tree at {data_dir!r}: expected {train_dir}/<class>/*.JPEG "
        "(and val/<class>/*.JPEG); use --set synthetic=True to benchmark without data")
  classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
  if not classes:
    raise FileNotFoundError(f"{train_dir} has no class sub-directories")
  return classes


def list_images(data_dir: str, split: str, classes: Sequence[str]) -> list[tuple[str, int]]:
  """``(path, label)`` of every image of ``split``, sorted (same on every host)."""
  records = []
  for label, name in enumerate(classes):
    class_dir = os.path.join(data_dir, split, name)
    if not os.path.isdir(class_dir):
      continue
    for entry in sorted(os.listdir(class_dir)):
      if entry.lower().endswith(IMAGE_EXTENSIONS):
        records.append((os.path.join(class_dir, entry), label))
  if not records:
    raise FileNotFoundError(f"no images under {os.path.join(data_dir, split)}/<class>/")
  return records


def _process_shard(records: list) -> list:
  return records[jax.process_index()::jax.process_count()]


def random_resized_crop(image: Image.Image, size: int, rng: np.random.Generator,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
  """Inception-style crop of a random area and aspect ratio, resized to ``size``."""
  width, height = image.size
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return image.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
  # Fallback: the centre crop of the largest allowed aspect ratio.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  left, top = (width - w) // 2, (height - h) // 2
  return image.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))


def center_crop(image: Image.Image, size: int, resize_size: int) -> Image.Image:
  """Resizes the short side to ``resize_size``, then crops the centre ``size``."""
  width, height = image.size
  factor = resize_size / min(width, height)
  new_w, new_h = max(size, round(width * factor)), max(size, round(height * factor))
  image = image.resize((new_w, new_h), Image.BILINEAR)
  left, top = (new_w - size) // 2, (new_h - size) // 2
  return image.crop((left, top, left + size, top + size))


def _load(path: str) -> Image.Image:
  try:
    with Image.open(path) as im:
      return im.convert("RGB")
  except (OSError, SyntaxError, ValueError) as e:   # truncated or not an image
    raise ValueError(f"{path}: not a readable image ({e})") from None


class _TrainTransform(grain.transforms.RandomMap):

  def __init__(self, image_size: int):
    self.image_size = image_size

  def random_map(self, record, rng: np.random.Generator):
    path, label = record
    image = random_resized_crop(_load(path), self.image_size, rng)
    if rng.uniform() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return {"image": np.asarray(image, np.uint8), "label": np.int32(label)}


class _EvalTransform(grain.transforms.Map):

  def __init__(self, image_size: int, resize_size: int):
    self.image_size, self.resize_size = image_size, resize_size

  def map(self, record):
    path, label = record
    if path is None:  # padding: masked out by label -1
      image = np.zeros((self.image_size, self.image_size, 3), np.uint8)
    else:
      image = np.asarray(center_crop(_load(path), self.image_size, self.resize_size),
                         np.uint8)
    return {"image": image, "label": np.int32(label)}


def train_dataset(data_dir: str, classes: Sequence[str], batch_size: int, *,
                  image_size: int, seed: int, start_step: int = 0,
                  num_threads: int = 16, prefetch: int = 128) -> Iterator[dict]:
  """Endless per-process training batches, reshuffled every epoch.

  The stream is a pure function of ``seed``, so a resumed run starts at batch
  ``start_step`` of the same stream.
  """
  records = _process_shard(list_images(data_dir, "train", classes))
  if len(records) < batch_size:
    raise ValueError(f"this process has {len(records)} training images, fewer than its "
                     f"batch of {batch_size}")
  ds = (grain.MapDataset.source(records)
        .shuffle(seed=seed)
        .repeat()
        .random_map(_TrainTransform(image_size), seed=seed)
        .batch(batch_size, drop_remainder=True))
  ds = ds[start_step:]
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                   prefetch_buffer_size=prefetch)))


def eval_steps(data_dir: str, classes: Sequence[str], global_batch_size: int) -> int:
  return math.ceil(len(list_images(data_dir, "val", classes)) / global_batch_size)


def eval_dataset(data_dir: str, classes: Sequence[str], batch_size: int, num_steps: int, *,
                 image_size: int, resize_size: int, num_threads: int = 16) -> Iterator[dict]:
  """``num_steps`` per-process batches covering this process's validation shard.

  Every process yields the same number of batches (a multi-host step needs
  all of them); the tail is padded with label -1, which the metrics ignore.
  """
  records = _process_shard(list_images(data_dir, "val", classes))
  records = records + [(None, -1)] * (num_steps * batch_size - len(records))
  ds = (grain.MapDataset.source(records)
        .map(_EvalTransform(image_size, resize_size))
        .batch(batch_size, drop_remainder=True))
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                   prefetch_buffer_size=4 * batch_size)))


def synthetic_batch(batch_size: int, image_size: int, num_classes: int, seed: int = 0) -> dict:
  """One batch of random uint8 images and labels with the real shapes."""
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (batch_size, image_size, image_size, 3), np.uint8),
          "label": rng.integers(0, num_classes, (batch_size,), np.int32)}


def normalize(images, dtype):
  """uint8 images to ``(x - mean) / std`` in ``dtype`` (runs on the device)."""
  mean = np.asarray(MEAN_RGB, np.float32)
  std = np.asarray(STDDEV_RGB, np.float32)
  return ((images.astype(np.float32) - mean) / std).astype(dtype)
