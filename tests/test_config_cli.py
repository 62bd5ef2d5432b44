"""examples/config_cli.py and the examples' command lines: typed fields, one-line
errors naming the field or file, defaults in one place."""

import ast
import dataclasses
import gzip
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from examples import config_cli
from examples.classification import input_pipeline as cls_input
from examples.classification.configs import base as cls_base
from examples.imagenet_resnet18 import input_pipeline as inet_input
from examples.imagenet_resnet18 import train as inet_train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_set_is_typed_by_the_dataclass():
  c = cls_base.Config()
  for item, field, value in (("batch_size=32", "batch_size", 32),
                             ("learning_rate=1e-3", "learning_rate", 1e-3),
                             ("per_channel=true", "per_channel", True),
                             ("train_subset=None", "train_subset", None),
                             ("train_subset=500", "train_subset", 500),
                             ("lr_milestones=[3, 6]", "lr_milestones", (3, 6)),
                             ("model_kwargs={'hidden': (8,)}", "model_kwargs", {"hidden": (8,)}),
                             ("method=laq", "method", "laq"), ("method='blaq'", "method", "blaq")):
    config_cli.set_field(c, item)
    assert getattr(c, field) == value, item
  for item, message in (("batch_size=abc", "--set: batch_size must be int, got 'abc'"),
                        ("batch_size=1.5", "--set: batch_size must be int, got '1.5'"),
                        ("per_channel=maybe", "per_channel must be bool"),
                        ("train_subset=x", "train_subset must be int or None"),
                        ("model_kwargs=3", "model_kwargs must be dict"),
                        ("nope=1", "Config has no field 'nope'"),
                        ("batch_size", "--set expects field=value")):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as e:
      config_cli.set_field(c, item)
    assert "\n" not in str(e.value)


def _cli(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=900, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin"})


def test_command_line_errors_are_one_line(tmp_path):
  """A bad value ends with one line on stderr naming the field, not a traceback."""
  for module, args, message in (
      ("examples.classification.main", ["--config", "mnist_mlp", "--set", "batch_size=abc"],
       "error: --set: batch_size must be int, got 'abc'"),
      ("examples.imagenet_resnet18.main", ["--config", "synthetic", "--batch-size", "0"],
       "error: config.batch_size must be >= 1, got 0")):
    proc = _cli(module, "--workdir", str(tmp_path / "w"), *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in proc.stderr


def test_damaged_files_are_named(tmp_path):
  good = tmp_path / "x-idx3-ubyte.gz"
  cls_input.write_idx(good, np.zeros((10, 28, 28), np.uint8))
  cut = tmp_path / "cut-idx3-ubyte.gz"
  cut.write_bytes(good.read_bytes()[:40])
  with pytest.raises(ValueError, match=f"{cut} is damaged"):
    cls_input.read_idx(cut)
  with gzip.open(tmp_path / "ok.gz", "wb") as f:
    f.write(b"not idx")
  with pytest.raises(ValueError, match="ok.gz is not an IDX file"):
    cls_input.read_idx(tmp_path / "ok.gz")
  from PIL import Image
  jpeg = tmp_path / "a.JPEG"
  Image.new("RGB", (64, 64), (10, 200, 30)).save(jpeg)
  jpeg.write_bytes(jpeg.read_bytes()[:200])
  with pytest.raises(ValueError, match=f"{jpeg}: not a readable image"):
    inet_input._load(str(jpeg))


def _config_calls(path):
  """Keyword arguments with literal values of every ``Config(...)`` in a config module."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Config":
      for kw in node.keywords:
        try:
          yield kw.arg, ast.literal_eval(kw.value)
        except ValueError:
          pass


@pytest.mark.parametrize("example,config_cls", [("classification", cls_base.Config),
                                                ("imagenet_resnet18", inet_train.Config)])
def test_configs_do_not_repeat_the_defaults(example, config_cls):
  defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
  for path in sorted((ROOT / "examples" / example / "configs").glob("*.py")):
    for name, value in _config_calls(path):
      assert defaults.get(name, object()) != value, f"{path.name}: {name}={value!r} is a default"
