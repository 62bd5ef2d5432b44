"""Bad flags and workdirs of the example CLIs: exit status 2 and one line, in-process.

Every flag is checked before any data is read or anything is compiled, so
these cases run ``main(argv)`` against a data directory that does not exist.
"""

import dataclasses
import urllib.request

import numpy as np
import pytest
from fake_data import write_fake_datasets

from examples import checkpointing
from examples import config_cli
from examples.classification import input_pipeline as ip
from examples.classification import main as cls_main
from examples.classification import train as cls_train
from examples.classification.configs import base as cls_base
from examples.imagenet_resnet18 import main as inet_main


@pytest.fixture(autouse=True)
def only_given_data_dirs(monkeypatch):
  """The data sets are looked for in --data-dir only: never in a shared copy."""
  monkeypatch.delenv(ip.DATA_ROOT_VARIABLE, raising=False)
  real = ip._candidate_dirs
  monkeypatch.setattr(ip, "_candidate_dirs", lambda name, data_dir, known: real(
      name, data_dir, ()))


def _error(main, argv, capsys):
  """Runs ``main(argv)`` as the command line does; returns the one error line."""
  capsys.readouterr()
  with pytest.raises(SystemExit) as info:
    config_cli.run_main(main, argv)
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err, err
  # The ImageNet example logs its set-up to stderr first; the error is the last line.
  line = err.strip().splitlines()[-1]
  assert line.startswith("error: "), err
  return line


def _cls(tmp_path, *args):
  return ["--config", "mnist_mlp", "--workdir", str(tmp_path / "w"), "--data-dir",
          str(tmp_path / "no_data"), "--no-progress", *args]


CLS_CASES = [
    (["--learning-rate", "nan"], r"config.learning_rate must be a number >= 0, got nan; set it "
     r"with --learning-rate"),
    (["--learning-rate", "inf"], r"config.learning_rate must be a number >= 0, got inf"),
    (["--learning-rate", "-1"], r"config.learning_rate must be a number >= 0, got -1.0"),
    (["--learning-rate", "fast"], r"--learning-rate: learning_rate must be float, got 'fast'"),
    (["--train-subset", "-5"], r"config.train_subset must be an int >= 1 or None, got -5"),
    (["--test-subset", "0"], r"config.test_subset must be an int >= 1 or None, got 0"),
    (["--seed", "-1"], r"config.seed must be an int >= 0, got -1; set it with --seed"),
    (["--bits", "9"], r"config.bits must be an int >= 1 and <= 8, got 9"),
    (["--a", "1.5"], r"config.a must be a number >= 0 and <= 1, got 1.5; set it with --a"),
    (["--set", "lookahead_phase=5"], r"config.lookahead_phase must be an int >= 0 and <= 4"),
    (["--stop-after-epoch", "0"], r"config.stop_after_epoch must be an int >= 1 or None"),
    (["--set", "max_consecutive_skips=0"], r"config.max_consecutive_skips must be an int >= 1"),
    (["--set", "model_kwargs={'hiden': (8,)}"],
     r"config.model_kwargs has unknown key\(s\) \['hiden'\]; allowed: \['in_features', "
     r"'hidden'"),
    (["--set", "scheme='uniform'"], r"config.scheme must be one of \('linear', 'log', "
     r"'ternary'\), got 'uniform'"),
    (["--set", "augment='flip'"], r"config.augment must be one of \(None, 'crop_flip'\)"),
    (["--method", "sgd"], None),   # argparse's own choices (exit 2, usage on stderr)
]


@pytest.mark.parametrize("args,pattern", CLS_CASES, ids=[" ".join(c[0]) for c in CLS_CASES])
def test_classification_bad_flag(tmp_path, capsys, args, pattern):
  if pattern is None:
    with pytest.raises(SystemExit) as info:
      cls_main.main(_cls(tmp_path, *args))
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    return
  line = _error(cls_main.main, _cls(tmp_path, *args), capsys)
  assert __import__("re").search(pattern, line), line
  assert not (tmp_path / "w").exists()   # refused before anything was written


def test_workdir_that_is_a_file(tmp_path, capsys):
  (tmp_path / "w").write_text("x")
  line = _error(cls_main.main, _cls(tmp_path), capsys)
  assert "--workdir" in line and "is a file" in line
  line = _error(inet_main.main, ["--config", "synthetic", "--workdir", str(tmp_path / "w")],
                capsys)
  assert "--workdir" in line and "is a file" in line


def test_download_without_network(tmp_path, capsys, monkeypatch):
  def offline(url, dest):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

  monkeypatch.setattr(urllib.request, "urlretrieve", offline)
  line = _error(cls_main.main, _cls(tmp_path, "--download"), capsys)
  assert "--download: could not download" in line and "check the network" in line


def test_labels_out_of_range(tmp_path, capsys):
  d = tmp_path / "data"
  d.mkdir()
  write_fake_datasets(d, sizes=(16, 8))
  path = d / "mnist" / "train-labels-idx1-ubyte.gz"
  labels = ip.read_idx(path).copy()
  labels[3] = 12
  ip.write_idx(path, labels)
  line = _error(cls_main.main, ["--config", "mnist_mlp", "--workdir", str(tmp_path / "w"),
                                "--data-dir", str(d), "--no-progress"], capsys)
  assert "mnist train: labels must be integers in [0, 10), found 0..12" in line


def test_changed_config_is_refused_before_data(tmp_path, capsys):
  config = cls_main.get_config("mnist_mlp")
  config.data_dir, config.progress = str(tmp_path / "no_data"), False
  ckpts = checkpointing.Checkpoints(tmp_path / "w" / "checkpoints",
                                    dataclasses.asdict(config))
  ckpts.save(1, {"x": np.zeros(2, np.float32)}, {"epoch": 1})
  ckpts.close()
  # The data directory does not exist: the config check must come first.
  line = _error(cls_main.main, _cls(tmp_path, "--seed", "3"), capsys)
  assert "holds a run with seed=0, this run has seed=3" in line


IMAGENET_CASES = [
    (["--learning-rate", "nan"], r"config.learning_rate must be a number >= 0, got nan"),
    (["--learning-rate", "-1"], r"config.learning_rate must be a number >= 0, got -1.0"),
    (["--seed", "-1"], r"config.seed must be an int >= 0, got -1"),
    (["--bits", "0"], r"config.bits must be an int >= 1 and <= 8, got 0"),
    (["--num-train-steps", "0"], r"config.num_train_steps must be an int >= 1, got 0"),
    (["--set", "first_last_bits=12"], r"config.first_last_bits must be an int >= 1 and <= 8"),
    (["--set", "max_consecutive_skips=0"], r"config.max_consecutive_skips must be an int >= 1"),
    (["--set", "model='ResNet99'"], r"config.model must be one of \('ResNet1', "),
    (["--init-from", "/nonexistent/params.npz"],
     r"config.init_from '/nonexistent/params.npz' does not exist"),
]


@pytest.mark.parametrize("args,pattern", IMAGENET_CASES,
                         ids=[" ".join(c[0]) for c in IMAGENET_CASES])
def test_imagenet_bad_flag(tmp_path, capsys, args, pattern):
  line = _error(inet_main.main, ["--config", "synthetic", "--workdir", str(tmp_path / "w"),
                                 *args], capsys)
  assert __import__("re").search(pattern, line), line
  assert not (tmp_path / "w").exists()


def test_imagenet_without_data_dir(tmp_path, capsys):
  line = _error(inet_main.main, ["--config", "default", "--workdir", str(tmp_path / "w")],
                capsys)
  assert "config.data_dir is empty; pass --data-dir" in line


def test_consecutive_skips_stop_the_run(tmp_path, capsys, monkeypatch):
  d = tmp_path / "data"
  d.mkdir()
  write_fake_datasets(d, sizes=(32, 8))
  nan_loss = lambda name, logits, labels: logits[:, 0] * np.nan
  monkeypatch.setattr(cls_train, "per_example_loss", nan_loss)
  config = cls_base.Config(method="laq", model_kwargs={"hidden": (8,)}, num_epochs=2,
                            batch_size=8, eval_batch_size=8, data_dir=str(d), progress=False,
                            plot=False, export=False, max_consecutive_skips=3)
  with pytest.raises(cls_train.TrainingStopped) as info:
    cls_train.train_and_evaluate(config, tmp_path / "w")
  message = str(info.value)
  assert "\n" not in message
  assert "epoch 1: 4 consecutive steps were skipped" in message, message
  assert "max_consecutive_skips=3" in message
  assert not (tmp_path / "w" / "checkpoints" / "1").exists()   # the diverged epoch is not saved
