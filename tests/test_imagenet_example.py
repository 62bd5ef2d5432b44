"""The ImageNet ResNet18 example on a tiny generated ImageFolder, 8 CPU devices."""

import dataclasses
import json
import os
import shutil

import chex
import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import blaq_jax as bq

from examples import checkpointing
from examples.imagenet_resnet18 import input_pipeline
from examples.imagenet_resnet18 import main
from examples.imagenet_resnet18 import models
from examples.imagenet_resnet18 import train
from helpers import end_to_end, max_abs_diff

pytestmark = end_to_end

CLASSES = ("n01440764", "n01443537")
N_TRAIN, N_VAL = 8, 3


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("imagefolder")
  rng = np.random.default_rng(0)
  for split, n in (("train", N_TRAIN), ("val", N_VAL)):
    for label, name in enumerate(CLASSES):
      os.makedirs(root / split / name)
      for i in range(n):
        # Class 0 dark, class 1 bright; sizes vary around 64 px.
        shape = (64, 48 + 8 * (i % 4), 3)
        pixels = rng.integers(0, 128, shape) + 127 * label
        Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.JPEG")
  (root / "train" / CLASSES[0] / "notes.txt").write_text("not an image")
  return str(root)


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def tiny_config(data_dir, parallel, **kw):
  config = main.get_config("default")
  return dataclasses.replace(
      config, data_dir=data_dir, parallel=parallel, model="ResNet1", num_filters=8,
      image_size=32, resize_size=36, batch_size=8, num_train_steps=2, log_every_steps=1,
      checkpoint_every_steps=2, num_data_threads=2, warmup_epochs=0.5, **kw)


def test_resnet18_parameter_count():
  model = nnx.eval_shape(lambda: models.ResNet18(num_classes=1000, rngs=nnx.Rngs(0)))
  assert models.param_count(model) == 11_689_512          # 11.7 M, as torchvision
  params = nnx.state(model, nnx.Param)
  spec = train.create_optimizer(main.get_config("default"), params, 10, 1)[0]
  by_path = {jax.tree_util.keystr(path, simple=True, separator="/"): s for path, s in
             jax.tree_util.tree_flatten_with_path(
                 spec, is_leaf=lambda x: x is None or isinstance(x, bq.QuantSpec))[0]}
  assert by_path["conv_init/kernel"].bits == 8
  assert by_path["head/kernel"].bits == 8
  assert by_path["head/bias"] is None
  assert by_path["blocks/3/conv2/kernel"].bits == 1


def test_input_pipeline(image_folder):
  classes = input_pipeline.find_classes(image_folder)
  assert classes == list(CLASSES)
  records = input_pipeline.list_images(image_folder, "train", classes)
  assert len(records) == 2 * N_TRAIN                       # notes.txt is skipped
  batches = input_pipeline.train_dataset(image_folder, classes, 8, image_size=32, seed=0,
                                         num_threads=1)
  first = [next(batches) for _ in range(3)]              # 3 batches > 1 epoch of 16
  for b in first:
    assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.uint8
    assert b["label"].dtype == np.int32 and set(b["label"]) <= {0, 1}
  # Resuming at batch 2 replays the same stream.
  again = next(input_pipeline.train_dataset(image_folder, classes, 8, image_size=32, seed=0,
                                            start_step=2, num_threads=1))
  np.testing.assert_array_equal(again["image"], first[2]["image"])
  steps = input_pipeline.eval_steps(image_folder, classes, 4)
  evals = list(input_pipeline.eval_dataset(image_folder, classes, 4, steps, image_size=32,
                                           resize_size=36, num_threads=1))
  labels = np.concatenate([b["label"] for b in evals])
  assert len(evals) == 2 and list(labels) == [0, 0, 0, 1, 1, 1, -1, -1]
  # Centre crop of the short-side resize: the class brightness survives.
  assert evals[0]["image"].mean() < 100 < evals[1]["image"][:2].mean()


def test_crops():
  rng = np.random.default_rng(0)
  image = Image.fromarray(np.zeros((40, 90, 3), np.uint8))
  assert input_pipeline.random_resized_crop(image, 24, rng).size == (24, 24)
  assert input_pipeline.center_crop(image, 24, 28).size == (24, 24)
  with pytest.raises(FileNotFoundError, match="ImageFolder"):
    input_pipeline.find_classes("/nonexistent")


@pytest.fixture(scope="module")
def first_runs(image_folder, tmp_path_factory):
  """2 training steps (then eval and a checkpoint) in each mode."""
  runs = {}
  for parallel in ("pmap", "jit"):
    workdir = str(tmp_path_factory.mktemp(parallel))
    config = tiny_config(image_folder, parallel)
    runs[parallel] = (config, workdir, train.train_and_evaluate(config, workdir))
    # The packed model of these 2 steps (a later resume writes another).
    os.replace(os.path.join(workdir, "model_packed.npz"),
               os.path.join(workdir, "model_packed_step2.npz"))
  return runs


@pytest.mark.parametrize("parallel", ["pmap", "jit"])
def test_eval_packed_equals_the_final_eval_accuracy(first_runs, parallel, capsys):
  """The packed file serves the trained model (packed weights and batch-norm
  statistics, unpacked inside the step) at the run's accuracy."""
  config, workdir, first = first_runs[parallel]
  path = os.path.join(workdir, "model_packed_step2.npz")
  served = train.evaluate_packed(config, path)
  assert served["eval_accuracy"] == first["eval_accuracy"]
  assert served["eval_images"] == first["eval_images"] == 2 * N_VAL
  np.testing.assert_allclose(served["eval_loss"], first["eval_loss"], rtol=1e-6)
  assert served["device_bytes"] < served["float_bytes"] / 4
  packed, stats = bq.load_packed_model(path)
  assert isinstance(packed["blocks/0/conv1/kernel"], bq.PackedArray)
  assert packed["conv_init/kernel"].spec.bits == 8 and "bn_init/mean" in stats
  # The command line does the same.
  flags = ["--config", "default", "--data-dir", config.data_dir, "--parallel", parallel,
           "--batch-size", "8", "--set", "model='ResNet1'", "--set", "num_filters=8",
           "--set", "image_size=32", "--set", "resize_size=36", "--set", "num_data_threads=2"]
  cli = main.main(flags + ["--eval-packed", path])
  assert cli["eval_accuracy"] == first["eval_accuracy"]
  assert "packed model" in capsys.readouterr().out


@pytest.mark.parametrize("parallel", ["pmap", "jit"])
def test_train_eval_checkpoint_resume(first_runs, parallel):
  config, workdir, first = first_runs[parallel]
  assert (first["start_step"], first["step"]) == (0, 2)
  assert np.isfinite(first["loss"]) and first["eval_images"] == 2 * N_VAL
  assert 0.0 <= first["eval_accuracy"] <= 1.0
  assert int(first["state"]["opt_state"].count) == 2
  saved = checkpointing.Checkpoints(os.path.join(workdir, "checkpoints"),
                                    dataclasses.asdict(config))
  step, restored, meta = saved.restore(first["state"])
  assert (step, meta) == (2, {"step": 2})
  chex.assert_trees_all_equal(restored, first["state"])
  saved.close()
  with pytest.raises(checkpointing.ResumeError, match="holds a run with bits=1, this run has"):
    train.train_and_evaluate(dataclasses.replace(config, bits=2), workdir)
  records = _records(workdir)
  assert [r["step"] for r in records if "loss" in r] == [1, 2]
  assert [r["skipped_steps"] for r in records if "loss" in r] == [0, 0]
  assert {r["config_hash"] for r in records} == {checkpointing.config_hash(
      dataclasses.asdict(config), train.FREE_ON_RESUME)}
  # --force with a changed config on the finished run would train nothing: refused.
  with pytest.raises(checkpointing.ResumeError, match="that run is finished"):
    train.train_and_evaluate(dataclasses.replace(config, bits=2), workdir, force=True)

  # Resume: one more step from the checkpoint; the step count carries on.
  second = train.train_and_evaluate(dataclasses.replace(config, num_train_steps=3), workdir)
  assert (second["start_step"], second["step"]) == (2, 3)
  assert int(second["state"]["opt_state"].count) == 3
  assert max_abs_diff(second["state"]["params"], first["state"]["params"]) > 0
  if parallel == "jit":
    # --fresh moves the old run aside whole before the new one writes anything.
    workdir = shutil.copytree(workdir, workdir + "_fresh")
    train.train_and_evaluate(dataclasses.replace(config, bits=2, num_train_steps=1), workdir,
                             fresh=True)
    assert [r["step"] for r in _records(workdir) if "loss" in r] == [1]
    assert {r["config_hash"] for r in _records(workdir)} == {checkpointing.config_hash(
        dataclasses.asdict(dataclasses.replace(config, bits=2, num_train_steps=1)),
        train.FREE_ON_RESUME)}
    assert [r["step"] for r in _records(workdir + ".old-1") if "loss" in r] == [1, 2, 3]
    assert sorted(os.listdir(os.path.join(workdir + ".old-1", "checkpoints"))) == ["2", "3"]


def test_pmap_and_jit_take_the_same_steps(first_runs):
  """Same data, same init: BatchNorm statistics and both BLAQ gradients are
  averaged over all devices under pmap, global under jit."""
  losses = {}
  for parallel, (_, workdir, _) in first_runs.items():
    # The first two steps: the resume test may have run a third in this workdir.
    losses[parallel] = [r["loss"] for r in _records(workdir) if "loss" in r and r["step"] <= 2]
  assert len(losses["pmap"]) == 2
  np.testing.assert_allclose(losses["pmap"], losses["jit"], rtol=1e-5)
  pmap_state, jit_state = first_runs["pmap"][2]["state"], first_runs["jit"][2]["state"]
  for key in ("params", "batch_stats"):
    chex.assert_trees_all_close(pmap_state[key], jit_state[key], rtol=1e-7, atol=1e-5)


def test_synthetic_mode_and_cli(tmp_path, capsys):
  summary = main.main([
      "--config", "synthetic", "--workdir", str(tmp_path), "--parallel", "jit",
      "--method", "laq", "--batch-size", "8", "--num-train-steps", "2",
      "--set", "model='ResNet1'", "--set", "num_filters=4", "--set", "image_size=32",
      "--set", "num_classes=10", "--set", "log_every_steps=1"])
  out = capsys.readouterr().out
  assert summary["step"] == 2 and np.isfinite(summary["loss"])
  assert summary["images_per_sec"] > 0 and "eval_accuracy" not in summary
  assert "\n  step " in out and "images_per_sec" in out   # a readable summary, not a dict
  with pytest.raises(ValueError, match="has no field 'no_such_field'"):
    main.main(["--config", "synthetic", "--workdir", str(tmp_path), "--set", "no_such_field=1"])
  with pytest.raises(ValueError, match="config.batch_size must be >= 1, got 0"):
    main.main(["--config", "synthetic", "--workdir", str(tmp_path / "b"), "--batch-size", "0"])
