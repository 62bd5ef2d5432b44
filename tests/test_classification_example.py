"""The classification example: one short epoch per model, resume, CLI, export."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fake_data import write_fake_datasets
from flax import nnx

import blaq_jax as bq
from examples import checkpointing
from examples.classification import main as main_lib
from examples.classification import models
from examples.classification import train
from examples.classification.configs import base
from helpers import end_to_end

pytestmark = end_to_end


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Tiny MNIST-format and CIFAR-format data sets (learnable: class = brightness)."""
  return write_fake_datasets(tmp_path_factory.mktemp("data"))


def _config(data_dir, **kw):
  kw_all = dict(dataset="mnist", model="mlp", model_kwargs={"hidden": (16, 16)}, method="blaq",
                num_epochs=2, batch_size=16, eval_batch_size=8, learning_rate=1e-2,
                data_dir=str(data_dir), progress=False, plot=False)
  kw_all.update(kw)
  return base.Config(**kw_all)


def _rows(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["fp", "bwn-ste", "laq", "blaq", "ste-alpha-blend"])
def test_mlp_one_epoch_each_method(tmp_path, data_dir, method):
  config = _config(data_dir, method=method, num_epochs=1)
  out = train.train_and_evaluate(config, tmp_path)
  (row,) = _rows(tmp_path)
  assert row["epoch"] == 1 and row["step"] == 4
  assert row["grad_evals"] == (8 if method == "blaq" else 4)
  assert 0 <= row["test_acc"] <= 1 and np.isfinite(row["train_loss"])
  for key in ("osc_flip_frequency", "osc_amplitude_mean", "osc_cosine", "train_s"):
    assert key in row
  assert 0 <= row["osc_flip_frequency"] <= 1
  # Evaluation uses the weights of the method (ŵ for the quantized ones).
  ctx, state = out["context"], out["state"]
  q = ctx.method.weights(state["params"], ctx.spec, state["opt_state"])
  kernel = np.asarray(q["dense"][0]["kernel"][...])
  distinct = len(np.unique(kernel))
  assert (distinct == 2) if method != "fp" else (distinct > 100)
  # The packed model holds exactly the weights that were evaluated.
  packed = tmp_path / "model_packed.npz"
  restored = bq.unpack(packed, like=state["params"])
  # The restored State holds arrays where q holds nnx.Params: compare the leaves.
  chex.assert_trees_all_equal(jax.tree.leaves(restored), jax.tree.leaves(q))
  assert "total" in (tmp_path / "size_report.txt").read_text()


@pytest.mark.parametrize("method", ["ste-dampen", "ste-freeze"])
def test_ste_variants_run(tmp_path, data_dir, method):
  config = _config(data_dir, method=method, num_epochs=1, model_kwargs={"hidden": (8,)},
                   checkpoint=False, export=False)
  out = train.train_and_evaluate(config, tmp_path)
  (row,) = _rows(tmp_path)
  assert row["grad_evals"] == 4 and np.isfinite(row["train_loss"])
  ctx, state = out["context"], out["state"]
  q = ctx.method.weights(state["params"], ctx.spec, state["opt_state"])
  assert len(np.unique(np.asarray(q["dense"][0]["kernel"][...]))) == 2


def test_lenet5_one_epoch(tmp_path, data_dir):
  config = _config(data_dir, model="lenet5", model_kwargs={}, method="laq", num_epochs=1,
                   checkpoint=False, export=False)
  train.train_and_evaluate(config, tmp_path)
  (row,) = _rows(tmp_path)
  assert row["step"] == 4 and 0 <= row["test_acc"] <= 1


def test_vgg_small_one_epoch(tmp_path, data_dir):
  config = _config(data_dir, dataset="cifar10", model="vgg_small",
                   model_kwargs={"width": 1 / 32}, method="laq", batch_size=8, num_epochs=1,
                   augment="crop_flip", checkpoint=False, export=False, train_subset=8)
  train.train_and_evaluate(config, tmp_path)
  (row,) = _rows(tmp_path)
  assert row["step"] == 1 and row["grad_evals"] == 1 and 0 <= row["test_acc"] <= 1


def test_resume_is_bit_exact(tmp_path, data_dir, capsys):
  full, split = tmp_path / "full", tmp_path / "split"
  a = train.train_and_evaluate(_config(data_dir, export=False), full)
  train.train_and_evaluate(_config(data_dir, export=False, stop_after_epoch=1), split)
  assert [r["epoch"] for r in _rows(split)] == [1]
  assert sorted(p.name for p in (split / "checkpoints").iterdir()) == ["1"]
  # A run killed during its next save leaves a temporary directory behind.
  (split / "checkpoints" / "2.orbax-checkpoint-tmp-7" / "state").mkdir(parents=True)
  # Another config is refused in one line naming the field; nothing is written.
  with pytest.raises(checkpointing.ResumeError, match=r"holds a run with seed=0, this run "):
    train.train_and_evaluate(_config(data_dir, export=False, seed=1), split)
  assert [r["epoch"] for r in _rows(split)] == [1]
  # A damaged metrics log (its last row cut short) is rebuilt from the checkpoint.
  log = split / "metrics.jsonl"
  log.write_text(log.read_text()[:40])
  b = train.train_and_evaluate(_config(data_dir, export=False), split)   # same config: resume
  out = capsys.readouterr().out
  assert "resumed from epoch 1" in out
  assert "1 missing or damaged row(s) restored from the checkpoint" in out
  la, lb = jax.tree.leaves(a["state"]), jax.tree.leaves(b["state"])
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  drop = lambda r: {k: v for k, v in r.items() if k != "train_s"}
  assert [drop(r) for r in _rows(full)] == [drop(r) for r in _rows(split)]
  rows = _rows(full)
  assert rows[1]["train_loss"] < rows[0]["train_loss"]  # BLAQ learns
  # --force on a finished run with another config would train nothing: refused.
  with pytest.raises(checkpointing.ResumeError, match=r"holds a run with bits=1, this run has "
                     r"bits=2; that run is finished"):
    train.train_and_evaluate(_config(data_dir, export=False, bits=2), full, force=True)
  # --force with another model cannot use the saved state: refused, nothing deleted.
  with pytest.raises(checkpointing.ResumeError, match="saved state does not fit"):
    train.train_and_evaluate(_config(data_dir, export=False, num_epochs=3,
                                     model_kwargs={"hidden": (8, 8)}), full, force=True)
  assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["1", "2"]
  # --fresh starts over in the used folder: its logs hold the new run only, and
  # the old run is moved aside whole, before anything new is written.
  train.train_and_evaluate(_config(data_dir, export=False, seed=1, num_epochs=1), split,
                           fresh=True)
  assert [r["epoch"] for r in _rows(split)] == [1]
  assert sorted(p.name for p in (split / "checkpoints").iterdir()) == ["1"]
  assert [r["epoch"] for r in _rows(tmp_path / "split.old-1")] == [1, 2]
  summary = json.loads((split / "summary.json").read_text())
  assert summary["config_hash"] == _rows(split)[0]["config_hash"] == train.config_hash(
      _config(data_dir, export=False, seed=1, num_epochs=1))


def test_main_cli(tmp_path, data_dir, capsys):
  main_lib.main(["--config", "mnist_mlp", "--method", "laq", "--workdir", str(tmp_path),
                 "--data-dir", str(data_dir), "--num-epochs", "1", "--batch-size", "32",
                 "--no-progress", "--no-export", "--set", "model_kwargs={'hidden': (8,)}",
                 "--set", "plot=False", "--set", "eval_batch_size=20"])
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["method"] == "laq" and config["model_kwargs"] == {"hidden": [8]}
  assert config["learning_rate"] == 1e-2 and config["num_epochs"] == 1
  assert _rows(tmp_path)[0]["step"] == 2
  assert "\n  test_acc " in capsys.readouterr().out   # a readable summary, not a dict
  with pytest.raises(ValueError, match="has no field 'nope'"):
    main_lib.main(["--config", "mnist_mlp", "--workdir", str(tmp_path), "--set", "nope=1"])


def test_config_validation():
  with pytest.raises(ValueError, match="config.method must be one of .*'fp', 'bwn-ste'"):
    base.Config(method="sgd").validate()
  with pytest.raises(ValueError, match="config.a"):
    base.Config(a=1.5).validate()
  with pytest.raises(ValueError, match="config.dataset"):
    base.Config(dataset="svhn").validate()
  with pytest.raises(ValueError, match=r"config.lookahead_phase must be an int >= 0 and <= 4"):
    base.Config(lookahead_phase=5).validate()
  for name in main_lib.CONFIGS:
    main_lib.get_config(name).validate()


def test_configs_import_no_training_code():
  """As in Flax's examples, configs/*.py import the config's module, not the
  training code: loading and validating every config leaves train.py and the
  modules only it uses unimported."""
  root = Path(__file__).resolve().parents[1]
  code = ("import importlib, sys\n"
          f"for name in {main_lib.CONFIGS!r}:\n"
          "  importlib.import_module('examples.classification.configs.' + name)"
          ".get_config().validate()\n"
          "print(sorted(m for m in sys.modules if m.startswith('examples')))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=root, env={**os.environ, "PYTHONPATH": str(root)}).stdout
  loaded = set(ast.literal_eval(out.strip().splitlines()[-1]))
  assert "examples.classification.configs.paper_mnist_lenet5" in loaded
  training = {f"examples.classification.{m}" for m in ("train", "resume", "weight_tracker")}
  assert not loaded & (training | {"examples.checkpointing", "examples.metrics_io"}), loaded


def test_paper_architectures():
  """Layer shapes of the paper's models (abstract init, no compute)."""
  mlp = nnx.eval_shape(lambda: models.MLP(rngs=nnx.Rngs(0)))
  assert [l.kernel.shape for l in mlp.dense] == [(784, 2048), (2048, 2048), (2048, 2048)]
  assert mlp.head.kernel.shape == (2048, 10)
  lenet = nnx.eval_shape(lambda: models.LeNet5(rngs=nnx.Rngs(0)))
  assert lenet.conv1.kernel.shape == (5, 5, 1, 32)
  assert lenet.conv2.kernel.shape == (5, 5, 32, 64)
  assert lenet.fc.kernel.shape == (4 * 4 * 64, 512)
  vgg = nnx.eval_shape(lambda: models.VGGSmall(rngs=nnx.Rngs(0)))
  assert [c.kernel.shape[-1] for c in vgg.convs] == [128, 128, 256, 256, 512, 512]
  assert [f.kernel.shape for f in vgg.fcs] == [(4 * 4 * 512, 1024), (1024, 1024)]
  for m in (mlp, lenet, vgg):
    assert len(jax.tree.leaves(nnx.state(m, nnx.BatchStat))) > 0
  out = models.LeNet5(rngs=nnx.Rngs(0))(jnp.ones((2, 28, 28, 1)))
  assert out.shape == (2, 10)


@pytest.mark.parametrize("model,method,bits", [("mlp", "blaq", 2), ("lenet5", "bwn-ste", 1)])
def test_eval_packed_equals_the_final_test_accuracy(tmp_path, data_dir, capsys, model, method,
                                                    bits):
  """The packed file serves the trained model: packed weights and batch-norm
  statistics, unpacked inside the jitted step, give the run's test accuracy."""
  kwargs = "{'hidden': (16,)}" if model == "mlp" else "{}"
  flags = ["--config", f"mnist_{model}", "--method", method, "--bits", str(bits),
           "--data-dir", str(data_dir), "--num-epochs", "1", "--batch-size", "16",
           "--learning-rate", "0.01", "--no-progress", "--set", f"model_kwargs={kwargs}",
           "--set", "plot=False", "--set", "eval_batch_size=8", "--set", "checkpoint=False"]
  out = main_lib.main(flags + ["--workdir", str(tmp_path)])
  path = tmp_path / "model_packed.npz"
  served = main_lib.main(flags + ["--eval-packed", str(path)])
  assert served["test_acc"] == out["metrics"]["test_acc"]
  np.testing.assert_allclose(served["test_loss"], out["metrics"]["test_loss"], rtol=1e-6)
  assert served["device_bytes"] < served["float_bytes"] / 4
  assert "packed model" in capsys.readouterr().out
  # Another config is refused in one line.
  with pytest.raises(ValueError, match=r"--eval-packed .* was written by a run with config "
                     r"hash \w+, this config has"):
    main_lib.main(flags + ["--seed", "1", "--eval-packed", str(path)])
