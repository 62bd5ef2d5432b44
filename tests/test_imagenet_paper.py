"""ResNet18 example: the paper's config, --init-from, and CIFAR-10 as an ImageFolder."""

import dataclasses
import os

import chex
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from examples import cifar10_to_imagefolder as c2i
from examples.classification import input_pipeline as cls_ip

pytest.importorskip("grain")  # the ImageNet example's pipeline
from examples.imagenet_resnet18 import input_pipeline  # noqa: E402
from examples.imagenet_resnet18 import main  # noqa: E402
from examples.imagenet_resnet18 import models  # noqa: E402
from examples.imagenet_resnet18 import train  # noqa: E402
from helpers import end_to_end

pytestmark = end_to_end


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory):
  """A fake CIFAR-10 (6 train images per batch file, 6 test) converted to PNG files."""
  src = tmp_path_factory.mktemp("cifar")
  batches = src / cls_ip.CIFAR10_DIR
  batches.mkdir()
  rng = np.random.default_rng(0)
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    y = np.arange(6) % 2 * 9                          # classes 0 (airplane) and 9 (truck)
    x = (rng.integers(0, 60, (6, 32, 32, 3)) + (y > 0)[:, None, None, None] * 190)
    cls_ip.write_cifar_batch(batches / name, x.astype(np.uint8), y)
  out = tmp_path_factory.mktemp("cifar_imagefolder")
  counts = c2i.convert(src, out)
  return src, str(out), counts


def test_cifar10_to_imagefolder(cifar_folder):
  src, out, counts = cifar_folder
  assert counts == {"train": 30, "val": 6}
  classes = input_pipeline.find_classes(out)
  assert classes == list(c2i.CLASSES)                # sorted names = label order
  records = input_pipeline.list_images(out, "train", classes)
  assert len(records) == 30 and {label for _, label in records} == {0, 9}
  # Lossless: the first training image reads back exactly.
  data = cls_ip.load_cifar10(src)
  path = os.path.join(out, "train", c2i.CLASSES[int(data["train"][1][0])], "00000.png")
  np.testing.assert_array_equal(np.asarray(Image.open(path)), data["train"][0][0])
  with pytest.raises(ValueError, match="labels"):
    c2i.write_split(np.zeros((2, 32, 32, 3), np.uint8), [0], out, "train")


def _tiny(config, **kw):
  return dataclasses.replace(config, model="ResNet1", num_filters=4, image_size=32,
                             resize_size=32, batch_size=8, num_train_steps=2, log_every_steps=1,
                             checkpoint_every_steps=2, num_data_threads=1, **kw)


def test_cifar_imagefolder_config_trains_through_grain(cifar_folder, tmp_path):
  _, out, _ = cifar_folder
  config = _tiny(main.get_config("cifar_imagefolder"), data_dir=out, method="blaq",
                 eval_every_steps=2)
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["step"] == 2 and np.isfinite(summary["loss"])
  assert summary["eval_images"] == 6 and summary["images_per_sec"] > 0


def test_paper_resnet18_config():
  c = main.get_config("paper_resnet18")
  assert (c.batch_size, c.num_epochs, c.learning_rate, c.lr_decay) == (256, 175.0, 2e-4, 0.95)
  assert (c.method, c.m, c.a, c.bits, c.first_last_bits) == ("blaq-m", 10, 0.9, 1, 8)
  params = nnx.state(nnx.eval_shape(lambda: models.ResNet18(num_classes=10,
                                                            rngs=nnx.Rngs(0))), nnx.Param)
  c.method = "laq"
  _, _, schedule = train.create_optimizer(c, params, 1000, 100)
  assert np.isclose(schedule(99), 2e-4) and np.isclose(schedule(250), 2e-4 * 0.95 ** 2)


@pytest.mark.parametrize("method", ["blaq", "blaq-m"])
def test_paper_resnet18_tiny_from_a_full_precision_checkpoint(tmp_path, method):
  """A full-precision (fp) run's checkpoint starts the paper's quantized run."""
  fp_dir = tmp_path / "fp"
  base = _tiny(main.get_config("paper_resnet18"), synthetic=True, num_classes=10)
  fp = train.train_and_evaluate(dataclasses.replace(base, method="fp"), str(fp_dir))
  npz = str(tmp_path / "fp.npz")
  train.save_params_npz(npz, fp["state"]["params"], fp["state"]["batch_stats"])
  model = models.create_model("ResNet1", num_classes=10, num_filters=4,
                              rngs=nnx.Rngs(1))
  _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  for source in (npz, str(fp_dir / "checkpoints" / "2")):
    p, s = train.load_init(source, params, stats)
    chex.assert_trees_all_equal(p, fp["state"]["params"])
  summary = train.train_and_evaluate(
      dataclasses.replace(base, method=method, init_from=npz), str(tmp_path / "q"))
  assert summary["step"] == 2 and np.isfinite(summary["loss"])
  with pytest.raises(ValueError, match="shape"):
    wide = models.create_model("ResNet1", num_classes=10, num_filters=8, rngs=nnx.Rngs(1))
    train.load_init(npz, *nnx.split(wide, nnx.Param, nnx.BatchStat)[1:])
