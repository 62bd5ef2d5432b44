"""Byte-level text from the Python standard library's own source files.

Every machine with Python has the corpus: the ``*.py`` files under the
running interpreter's ``Lib/`` directory (``sysconfig.get_paths()["stdlib"]``;
``site-packages`` is left out), read as bytes, sorted by their path relative
to that directory and joined with one ``\\0`` byte between files.

**The split** is fixed by each file's relative path, not by the machine: a
file is in the validation split when the first byte of the SHA-1 of its
relative path (POSIX separators) is below 26 (about 10% of the files); every
other file is in the training split. The byte counts depend on the Python
version; :func:`load_corpus` returns them and the example prints them.

Batches are windows of ``seq_len + 1`` bytes: training windows start at
random offsets drawn from ``(seed, step)``, so a resumed run sees exactly the
batches it would have seen; validation windows are evenly spaced and fixed.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import numpy as np

VOCAB_SIZE = 256     # bytes
SEPARATOR = b"\0"    # between files


def default_corpus_dir() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


def is_validation(relative_path: str) -> bool:
  """The fixed split: about 10% of the files, chosen by their path's SHA-1."""
  return hashlib.sha1(relative_path.encode()).digest()[0] < 26


def corpus_files(root: Path) -> list[tuple[str, Path]]:
  """``(relative path, path)`` of every ``*.py`` file under ``root``, sorted."""
  if not root.is_dir():
    raise ValueError(f"config.corpus_dir {str(root)!r} is not a directory; pass a directory "
                     "holding .py files with --corpus-dir")
  files = []
  for path in root.rglob("*.py"):
    rel = path.relative_to(root).as_posix()
    if "site-packages" in rel.split("/") or not path.is_file():
      continue
    files.append((rel, path))
  if not files:
    raise ValueError(f"config.corpus_dir {str(root)!r} holds no .py files")
  return sorted(files)


def load_corpus(corpus_dir: str | None = None, max_bytes: int | None = None) -> dict:
  """``{"train": uint8 array, "val": uint8 array, "files": {"train": n, "val": n}}``.

  ``max_bytes`` keeps the first ``max_bytes`` bytes of each split.
  """
  root = Path(corpus_dir) if corpus_dir else default_corpus_dir()
  parts = {"train": [], "val": []}
  for rel, path in corpus_files(root):
    parts["val" if is_validation(rel) else "train"].append(path.read_bytes())
  out = {"files": {k: len(v) for k, v in parts.items()}}
  for split, texts in parts.items():
    data = np.frombuffer(SEPARATOR.join(texts), np.uint8)
    out[split] = data[:max_bytes] if max_bytes else data
  return out


def check_length(data: np.ndarray, seq_len: int, split: str) -> None:
  if len(data) < seq_len + 2:
    raise ValueError(f"the {split} split holds {len(data)} bytes, fewer than one window of "
                     f"seq_len + 1 = {seq_len + 1}; lower --set seq_len or use a larger corpus")


def train_batch(data: np.ndarray, batch_size: int, seq_len: int, seed: int,
                step: int) -> np.ndarray:
  """The training batch of ``step``: ``int32 [batch_size, seq_len + 1]`` windows."""
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, len(data) - seq_len - 1, batch_size)
  return np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int32)


def eval_batches(data: np.ndarray, batch_size: int, seq_len: int, num_batches: int):
  """``num_batches`` fixed batches of evenly spaced windows (the same every call)."""
  n = batch_size * num_batches
  starts = np.linspace(0, len(data) - seq_len - 1, n).astype(np.int64)
  windows = np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int32)
  return list(windows.reshape(num_batches, batch_size, seq_len + 1))
