"""Smoke tests of the benchmark scripts (tiny sizes; no timing is asserted)."""

import json

import jax
import numpy as np
import pytest

from benchmarks import convergence
from benchmarks import step_time
from helpers import end_to_end

pytestmark = end_to_end


def test_step_time_quick(tmp_path):
  methods = "fp,laq@2,blaq@1,blaq-m@1"
  report = step_time.main(["--quick", "--methods", methods, "--m", "3", "--clock", "cpu",
                           "--out", str(tmp_path)])
  saved = json.loads((tmp_path / "mlp_tiny_float32_b16.json").read_text())
  table = (tmp_path / "mlp_tiny_float32_b16.md").read_text()
  assert list(saved["results"]) == methods.split(",")
  for name, r in saved["results"].items():
    assert r["time"]["median_ms"] > 0 and r["time"]["n"] == 4, name
    assert f"| {name} |" in table
  assert saved["results"]["blaq@1"]["grad_evals"] == 2
  assert saved["results"]["laq@2"]["grad_evals"] == 1
  assert (saved["results"]["laq@2"]["method"], saved["results"]["laq@2"]["bits"]) == ("laq", 2)
  # blaq-m: the two-stage step on one call in 3, both kinds timed from the first.
  scheduled = saved["results"]["blaq-m@1"]
  assert np.isclose(scheduled["grad_evals"], 1 + 1 / 3)
  assert {k: t["n"] for k, t in scheduled["time"]["by_kind"].items()} == {"active": 2,
                                                                          "inactive": 2}
  assert "| blaq-m@1:active |" in table
  # LAQ = Adam + one float32 scale per quantized kernel + the skipped counter
  # and b2, eps (it computes D from v); BLAQ also stores D_mix for the kernels.
  kernels = [w for w in jax.tree.leaves(_tiny_params()) if w.ndim >= 2]
  res = saved["results"]
  laq_extra = 4 * len(kernels) + 4 + 2 * 4
  assert res["laq@2"]["opt_state_bytes"] == res["fp"]["opt_state_bytes"] + laq_extra
  assert res["blaq@1"]["opt_state_bytes"] == (res["laq@2"]["opt_state_bytes"] - 8
                                              + sum(w.nbytes for w in kernels))
  assert {r["ratio"] for r in saved["ratios"]} == {"laq@2/fp"}
  assert set(saved["components"]) == {"grad_eval", *(f"{m}:update" for m in res)}
  assert report["config"]["model"] == "mlp_tiny"
  assert saved["config"]["clock"] == "cpu" and "cpu clock" in table
  assert saved["env"]["jax"] == jax.__version__ and saved["env"]["commit"]


def _tiny_params():
  from flax import nnx
  import jax.numpy as jnp
  model, _ = step_time.build_model("mlp_tiny", jnp.float32)
  return nnx.state(model, nnx.Param)


def test_step_time_rejects_bad_input():
  with pytest.raises(ValueError, match="--model"):
    step_time.run("resnet50")
  with pytest.raises(ValueError, match="--methods: unknown method 'adam'"):
    step_time.run("mlp_tiny", methods="adam,laq@1")


def tiny_mnist(root):
  """Four small MNIST-format IDX files (random digits) that the test writes itself."""
  from examples.classification import input_pipeline as ip
  rng = np.random.default_rng(0)
  root.mkdir(parents=True, exist_ok=True)
  for split, n in (("train", 200), ("test", 100)):
    ip.write_idx(root / ip.IDX_FILES[f"{split}_images"],
                 rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    ip.write_idx(root / ip.IDX_FILES[f"{split}_labels"],
                 rng.integers(0, 10, (n,), dtype=np.uint8))
  return root


def test_convergence_tiny(tmp_path, monkeypatch):
  from examples.classification import input_pipeline as ip
  urls, md5s, _, advice = ip.IDX_DATASETS["mnist"]
  # No default data folders: only the fixture is read.
  monkeypatch.setitem(ip.IDX_DATASETS, "mnist", (urls, md5s, (), advice))
  data = tiny_mnist(tmp_path / "mnist")
  out = convergence.main([
      "--datasets", "mnist", "--methods", "laq,blaq,laq_2x", "--seeds", "0",
      "--epochs", "1", "--hidden", "16", "--train-subset", "200", "--test-subset", "100",
      "--batch-size", "50", "--data-dir", str(data), "--out", str(tmp_path / "out")])
  tmp_path = tmp_path / "out"
  s = out["summary"]["mnist"]["methods"]
  assert s["laq"]["grad_evals"] == 4 and s["laq"]["epochs"] == 1
  assert s["blaq"]["grad_evals"] == 8 and s["laq_2x"]["grad_evals"] == 8
  assert s["laq_2x"]["epochs"] == 2
  # At LAQ's budget G = 4 evaluations BLAQ has no finished epoch (its first costs
  # 8); LAQ-2x's first epoch (4) fits.
  assert s["blaq"]["acc_at_G"] is None and s["laq_2x"]["acc_at_G"] is not None
  for r in s.values():
    assert 0 <= r["final_acc"] <= 1 and r["flip_rate_mean"] >= 0
  assert (tmp_path / "curves_mnist.png").stat().st_size > 0
  md = (tmp_path / "summary.md").read_text()
  assert "| laq_2x | 2 | 8 |" in md
  saved = json.loads((tmp_path / "summary.json").read_text())
  assert len(saved["runs"]["mnist"]["laq_2x"]["0"]) == 2


def test_convergence_method_names():
  assert convergence.parse_method("laq_2x") == ("laq", 2)
  assert convergence.parse_method("bwn-ste") == ("bwn-ste", 1)
  for bad in ("adamw", "laq_x", "laq_0x"):
    with pytest.raises(ValueError, match="--methods"):
      convergence.parse_method(bad)


def test_serving_quick(tmp_path):
  from benchmarks import serving
  report = serving.main(["--quick", "--models", "mlp", "--out", str(tmp_path)])
  saved = json.loads((tmp_path / "serving_1bit_quick.json").read_text())
  (result,) = saved["results"]
  assert result["model"] == "mlp" and result["bits"] == 1
  assert result["packed_bytes"] < result["float_bytes"] / 16
  assert set(result["batches"]) == {"1", "8"}
  for timing in result["batches"].values():
    assert set(timing) == {"float", "packed", "dequantize"}
    assert all(t["median_ms"] > 0 and t["n"] == 4 for t in timing.values())
  assert "| mlp | 1 |" in (tmp_path / "serving_1bit_quick.md").read_text()
  assert report["config"]["quick"]
  with pytest.raises(ValueError, match="--models: unknown model 'vgg'"):
    serving.main(["--quick", "--models", "vgg", "--out", str(tmp_path)])


def test_step_time_lm_quantizes_as_the_lm_example():
  from flax import nnx
  model, _ = step_time.build_model("lm", jax.numpy.float32)
  params = nnx.state(model, nnx.Param)
  spec = step_time.make_spec("lm", params, 2, first_last_bits=None)
  assert spec["blocks"][0]["up"]["kernel"].group_size == 64
  assert spec["blocks"][0]["up"]["kernel"].bits == 2
  assert spec["embed"]["embedding"].bits == spec["head"]["kernel"].bits == 8
  report = step_time.run("lm", batch=2, methods="laq@2", warmup=1, rounds=1, steps=1,
                         components=False, clock="cpu")
  assert report["config"]["methods"] == ["laq@2"]
  assert report["results"]["laq@2"]["time"]["mean_ms"] > 0
