"""The byte-level LM example: a tiny config end to end, FSDP against one device, resume."""

import dataclasses
import json

import chex
import jax
import numpy as np
import pytest

from examples import config_cli
from examples.lm import input_pipeline
from examples.lm import main as lm_main
from examples.lm import train
from examples.lm.configs import tiny
from helpers import end_to_end, slow

pytestmark = end_to_end


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  """A small corpus of .py files (the split is fixed by each file's path)."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = [b"def ", b"return ", b"self", b"import ", b"x", b" = ", b"(", b")", b":\n    ",
           b"\n", b"if ", b"for ", b"in ", b"1", b"0"]
  for i in range(40):
    text = b"".join(words[j] for j in rng.integers(0, len(words), 600))
    (root / f"pkg{i % 4}").mkdir(exist_ok=True)
    (root / f"pkg{i % 4}" / f"m{i}.py").write_bytes(text)
  (root / "site-packages").mkdir()
  (root / "site-packages" / "skip.py").write_bytes(b"never read")
  return str(root)


def _config(corpus_dir, **kw):
  return dataclasses.replace(tiny.get_config(), corpus_dir=corpus_dir, **kw)


def test_corpus_split_is_fixed_by_path(corpus_dir):
  data = input_pipeline.load_corpus(corpus_dir)
  val = [f"pkg{i % 4}/m{i}.py" for i in range(40)
         if input_pipeline.is_validation(f"pkg{i % 4}/m{i}.py")]
  assert data["files"] == {"train": 40 - len(val), "val": len(val)} and 0 < len(val) < 40
  assert b"never read" not in data["train"].tobytes() + data["val"].tobytes()
  a = input_pipeline.train_batch(data["train"], 4, 16, seed=0, step=7)
  np.testing.assert_array_equal(a, input_pipeline.train_batch(data["train"], 4, 16, 0, 7))
  assert a.shape == (4, 17) and a.dtype == np.int32


def test_tiny_run_is_sharded(tmp_path, corpus_dir):
  sharded = train.train_and_evaluate(_config(corpus_dir, method="laq"), tmp_path / "fsdp")
  _check_sharded_run(sharded, tmp_path / "fsdp")


@slow
@pytest.mark.parametrize("method", ["laq", "blaq-m"])
def test_tiny_run_fsdp_equals_one_device(tmp_path, corpus_dir, method):
  sharded = train.train_and_evaluate(_config(corpus_dir, method=method), tmp_path / "fsdp")
  single = train.train_and_evaluate(_config(corpus_dir, method=method, fsdp_devices=1),
                                    tmp_path / "one")
  assert single["devices"] == 1
  chex.assert_trees_all_close(jax.device_get(sharded["state"]),
                              jax.device_get(single["state"]), rtol=2e-5, atol=2e-6)
  assert abs(sharded["val_bpb"] - single["val_bpb"]) < 1e-4
  # Each device holds about 1/N of the state: the kernels and their moments are split.
  assert sharded["state_bytes_per_device_max"] < 0.5 * single["state_bytes_per_device_max"]
  _check_sharded_run(sharded, tmp_path / "fsdp")


def _check_sharded_run(sharded, workdir):
  assert sharded["devices"] == jax.device_count()
  kernel = sharded["state"]["params"]["blocks"][0]["up"]["kernel"][...]
  assert len(kernel.sharding.device_set) == jax.device_count()
  assert kernel.addressable_shards[0].data.size == kernel.size // jax.device_count()
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [3, 6] and np.isfinite(rows[-1]["val_bpb"])
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["packed_bytes"] < summary["fp32_bytes"] / 4


@slow
def test_resume_is_exact(tmp_path, corpus_dir):
  full = train.train_and_evaluate(_config(corpus_dir), tmp_path / "full")
  train.train_and_evaluate(_config(corpus_dir, num_train_steps=3), tmp_path / "split")
  resumed = train.train_and_evaluate(_config(corpus_dir), tmp_path / "split")
  chex.assert_trees_all_equal(jax.device_get(full["state"]), jax.device_get(resumed["state"]))


def test_cli_bad_flags(tmp_path, capsys):
  for args, text in ((["--bits", "9"], "config.bits must be an int >= 1 and <= 8, got 9"),
                     (["--group-size", "0"], "config.group_size must be an int >= 1"),
                     (["--set", "d_model=31"], "config.d_model 31 must be a multiple of"),
                     (["--set", "warmup_steps=6"], "config.warmup_steps 6 must be below")):
    with pytest.raises(SystemExit) as info:
      config_cli.run_main(lm_main.main, ["--config", "tiny", "--workdir", str(tmp_path / "w"),
                                         *args])
    assert info.value.code == 2
    assert text in capsys.readouterr().err
  assert not (tmp_path / "w").exists()
