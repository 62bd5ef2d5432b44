"""The paper's protocol in examples/classification: configs, loss, BN, schedules,
validation split, BLAQ every m epochs, LAQ at BLAQ's budget, per-weight tracking."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fake_data import write_fake_datasets
from flax import nnx

import blaq_jax as bq
from examples import methods
from examples import metrics_io
from examples import statistics
from examples.classification import main as main_lib
from examples.classification import models
from examples.classification import report
from examples.classification import train
from examples.classification import weight_tracker
from examples.classification.configs import base
from examples.classification.configs import paper
from helpers import end_to_end, some_slow

pytestmark = end_to_end

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Tiny MNIST, Fashion-MNIST and CIFAR-10 files (class = brightness)."""
  return write_fake_datasets(tmp_path_factory.mktemp("paper_data"),
                             ("mnist", "fashion_mnist"), (48, 16))


def _rows(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


# Tiny sizes through the config mechanism (--set), BN settings of the paper kept.
TINY = {
    "paper_mnist_mlp": ["model_kwargs={'hidden': (16, 16), 'head_norm': True, "
                        "'bn_eps_on_std': True, 'bn_eps': 1e-4}"],
    "paper_mnist_lenet5": [],
    "paper_fashion_lenet5": [],
    "paper_cifar10_vgg": ["model_kwargs={'width': 0.03125, 'head_norm': True, "
                          "'bn_eps_on_std': True, 'bn_eps': 1e-4}"],
}


@pytest.mark.parametrize("name", some_slow(sorted(TINY), fast={1, 2, 3}))
def test_paper_config_one_tiny_epoch(tmp_path, data_dir, name):
  cifar = "cifar" in name
  argv = ["--config", name, "--workdir", str(tmp_path), "--data-dir", str(data_dir),
          "--num-epochs", "1", "--batch-size", "8" if cifar else "16",
          "--val-split", "8" if cifar else "16", "--method", "laq", "--no-progress",
          "--no-export", "--set", "plot=False", "--set",
          "eval_batch_size=8" if cifar else "eval_batch_size=16",
          "--set", "checkpoint=False"]
  for item in TINY[name]:
    argv += ["--set", item]
  main_lib.main(argv)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["loss"] == "squared_hinge" and config["schedule_reading"] == "reference"
  assert config["model_kwargs"]["bn_eps_on_std"] and config["model_kwargs"]["head_norm"]
  (row,) = _rows(tmp_path)
  assert 0 <= row["val_acc"] <= 1 and 0 <= row["test_acc"] <= 1
  assert np.isfinite(row["train_loss"]) and row["loss_diff_std"] >= 0
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["best_val_epoch"] == 1
  assert summary["test_acc_at_best_val"] == summary["test_acc_last"] == row["test_acc"]


def test_paper_configs_as_specified():
  mlp = main_lib.get_config("paper_mnist_mlp")
  assert mlp.model_kwargs["hidden"] == (2048, 2048, 2048)
  assert (mlp.batch_size, mlp.num_epochs, mlp.val_split) == (100, 50, 10_000)
  assert (mlp.learning_rate, mlp.lr_schedule, mlp.lr_milestones) == (0.01, "step", (15, 25))
  assert (mlp.a, mlp.m, mlp.loss) == (0.6, 5, "squared_hinge")
  lenet = main_lib.get_config("paper_mnist_lenet5")
  assert (lenet.model, lenet.batch_size, lenet.num_epochs) == ("lenet5_paper", 128, 20)
  assert main_lib.get_config("paper_fashion_lenet5").dataset == "fashion_mnist"
  vgg = main_lib.get_config("paper_cifar10_vgg")
  assert (vgg.batch_size, vgg.num_epochs, vgg.val_split, vgg.augment) == (100, 100, 5000, None)
  assert (vgg.lr_schedule, vgg.lr_decay_every, vgg.lr_decay) == ("step_every", 15, 0.5)
  app = paper.apply_reading(main_lib.get_config("paper_mnist_mlp"), "appendix")
  assert (app.learning_rate, app.lr_schedule, app.lr_decay_every, app.lr_decay) == (
      0.005, "step_every", 5, 0.1)
  lenet = nnx.eval_shape(lambda: models.LeNet5Paper(rngs=nnx.Rngs(0)))
  assert lenet.conv1.kernel.shape == (3, 3, 1, 20)
  assert lenet.conv2.kernel.shape == (3, 3, 20, 50)
  assert lenet.fc.kernel.shape == (50 * 5 * 5, 500) and lenet.head.kernel.shape == (500, 10)


def test_squared_hinge():
  logits = jnp.array([[0.5, -2.0, 1.5], [0.0, 0.0, 0.0]])
  labels = jnp.array([2, 0])
  t = np.array([[-1, -1, 1], [1, -1, -1]], float)
  want = np.mean(np.maximum(0, 1 - t * np.asarray(logits)) ** 2, axis=1)
  np.testing.assert_allclose(train.per_example_loss("squared_hinge", logits, labels), want,
                             rtol=1e-6)


def test_std_eps_batch_norm():
  bn = models.StdEpsBatchNorm(3, epsilon=1e-4)
  x = jax.random.normal(jax.random.key(0), (16, 3)) * jnp.array([1.0, 3.0, 0.0]) + 2.0
  y = bn(x, use_running_average=False)
  mean, std = np.mean(np.asarray(x), 0), np.std(np.asarray(x), 0)
  np.testing.assert_allclose(y, (np.asarray(x) - mean) / (std + 1e-4), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(bn.mean[...], 0.1 * mean, rtol=1e-5)
  g = jax.grad(lambda x: jnp.sum(models.StdEpsBatchNorm(3)(x) ** 2))(x)
  assert np.isfinite(np.asarray(g)).all()                  # zero-variance feature
  mlp = models.MLP(in_features=4, hidden=(8,), head_norm=False, rngs=nnx.Rngs(0))
  assert mlp.head_norm is None and mlp(jnp.ones((2, 4)), train=True).shape == (2, 10)


def test_step_schedules_and_budget_scaling():
  schedule = lambda cfg: train.make_schedule(cfg, base.resolve(cfg, 10))   # 10 steps an epoch
  cfg = main_lib.get_config("paper_mnist_mlp")
  lr = schedule(cfg)
  assert np.isclose(lr(149), 0.01) and np.isclose(lr(150), 1e-3) and np.isclose(lr(250), 1e-4)
  app = paper.apply_reading(main_lib.get_config("paper_mnist_mlp"), "appendix")
  lr = schedule(app)
  assert np.isclose(lr(49), 0.005) and np.isclose(lr(50), 5e-4) and np.isclose(lr(100), 5e-5)
  cifar = schedule(main_lib.get_config("paper_cifar10_vgg"))
  assert np.isclose(cifar(149), 0.02) and np.isclose(cifar(150), 0.01)
  # LAQ at BLAQ's gradient budget: 2x (every step) or (1 + 1/m)x the epochs, and
  # the schedule stretched with them.
  cfg.method = "laq-as-blaq"
  assert base.resolve(cfg).epochs == 100
  lr = schedule(cfg)
  assert np.isclose(lr(299), 0.01) and np.isclose(lr(300), 1e-3)
  cfg.method = "laq-as-blaq-m"
  assert base.resolve(cfg).epochs == 60
  assert base.resolve(dataclasses.replace(cfg, m=10)).epochs == 55
  exp = base.Config(lr_schedule="exponential", lr_decay=0.95, learning_rate=2e-4)
  lr = schedule(exp)
  assert np.isclose(lr(9), 2e-4) and np.isclose(lr(25), 2e-4 * 0.95 ** 2)
  cosine = schedule(base.Config(num_epochs=3, method="laq-as-blaq"))
  assert cosine(59) > 0 and np.isclose(cosine(60), 0)       # over the 6 epochs run


def _grad_evals(config, steps, steps_per_epoch=1):
  run = base.resolve(config, steps_per_epoch)
  return run.method.grad_evals(run.options, steps)


def test_lookahead_accounting():
  o = methods.Options(m=5, steps_per_epoch=10)
  assert methods.lookahead_steps(o, 50) == 10              # epoch 5 of 5 (index 4)
  assert methods.lookahead_steps(o, 45) == 5
  assert _grad_evals(base.Config(method="blaq-m", m=5), 100, 10) == 120
  assert methods.lookahead_steps(methods.Options(m=5, steps_per_epoch=10,
                                                 lookahead_phase=0), 11) == 10
  assert _grad_evals(base.Config(method="blaq"), 7) == 14
  assert _grad_evals(base.Config(method="laq-as-blaq"), 7) == 7
  assert methods.get("blaq-m").grad_evals_per_step(o) == 1.2


def test_lookahead_accounting_matches_the_schedule():
  for m, spe, phase in ((5, 3, None), (2, 4, 0), (3, 1, 2)):
    o = methods.Options(m=m, steps_per_epoch=spe, lookahead_phase=phase)
    sched = bq.periodic_lookahead(m, spe, phase=phase)
    active = [bool(sched(jnp.asarray(c))) for c in range(4 * m * spe)]
    for steps in range(len(active) + 1):
      assert methods.lookahead_steps(o, steps) == sum(active[:steps]), (m, spe, steps)


def _tiny(data_dir, **kw):
  kw_all = dict(dataset="mnist", model="mlp", model_kwargs={"hidden": (16,)}, method="laq",
                num_epochs=1, batch_size=16, eval_batch_size=16, learning_rate=1e-2,
                data_dir=str(data_dir), progress=False, plot=False, export=False,
                checkpoint=False)
  kw_all.update(kw)
  return base.Config(**kw_all)


def test_blaq_m_spends_one_epoch_in_m(tmp_path, data_dir):
  train.train_and_evaluate(_tiny(data_dir, method="blaq-m", m=2, num_epochs=2), tmp_path)
  assert [r["grad_evals"] for r in _rows(tmp_path)] == [3, 3 + 6]   # 3 steps per epoch


def test_laq_at_blaqs_budget(tmp_path, data_dir):
  train.train_and_evaluate(_tiny(data_dir, method="laq-as-blaq"), tmp_path)
  rows = _rows(tmp_path)
  assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["grad_evals"] == 2 * 3


def test_per_weight_tracking(tmp_path, data_dir):
  cfg = _tiny(data_dir, bits=2, num_epochs=2, track_weights=40, track_last_epochs=2,
              model_kwargs={"hidden": (16, 16)})
  out = train.train_and_evaluate(cfg, tmp_path)
  rows = _rows(tmp_path)
  saved = np.load(tmp_path / "tracked_weights.npz")
  assert saved["w"].shape == saved["codes"].shape == (6, 40)      # 2 epochs x 3 steps
  assert rows[0]["tw_window_steps"] == 3 and rows[1]["tw_window_steps"] == 6
  flips = np.count_nonzero(np.diff(saved["codes"], axis=0), axis=0)
  amp = saved["w"].max(0) - saved["w"].min(0)
  r = rows[1]
  assert r["tw_flips_max"] == flips.max() and np.isclose(r["tw_flips_mean"], flips.mean())
  assert np.isclose(r["tw_amp_max"], amp.max()) and r["tw_grid_mismatch"] == 0
  # The sampled weights' codes are those of the projection the step used:
  # ŵ = α · codebook[code] exactly, α the leaf's scale in the LAQ state.
  ctx, state = out["context"], out["state"]
  tracker = ctx.tracker
  q = ctx.method.weights(state["params"], ctx.spec, state["opt_state"])
  packed = ctx.method.pack(state["params"], ctx.spec, state["opt_state"])
  w, codes = jax.jit(tracker.gather)(state["params"], packed)
  leaves, qleaves = jax.tree.leaves(state["params"]), jax.tree.leaves(q)
  pleaves = jax.tree.leaves(packed, is_leaf=lambda x: isinstance(x, bq.PackedArray))
  start, seen = 0, set()
  for i, _, spec, idx in tracker.leaves:
    np.testing.assert_array_equal(w[start:start + len(idx)], leaves[i].reshape(-1)[idx])
    got = np.asarray(codes[start:start + len(idx)])
    alpha = float(np.asarray(pleaves[i].scale).reshape(-1)[0])     # one scale per tensor
    np.testing.assert_allclose(alpha * spec.codebook()[got],
                               np.asarray(qleaves[i]).reshape(-1)[idx], rtol=1e-6)
    seen.update(got.tolist())
    start += len(idx)
  assert len(seen) >= 3     # 2 bits: more than the two signs are seen
  # -0.0 (stored at the packed codebook's spare index) is the code 0.
  zeros = {"w": jnp.array([[-0.0, 0.0], [1.0, -1.0]])}
  spec2 = {"w": bq.QuantSpec(2)}
  zt = weight_tracker.WeightTracker(zeros, spec2, 4, 0)
  _, zc = zt.gather(zeros, bq.pack_params(zeros, spec2))
  book = spec2["w"].codebook()
  np.testing.assert_array_equal(book[np.asarray(zc)],
                                np.asarray(zeros["w"]).reshape(-1)[zt.flat_indices()])
  # Same seed and model: the same weights are sampled whatever the method.
  other = weight_tracker.WeightTracker(state["params"], ctx.spec, 40, cfg.seed)
  assert other.paths() == tracker.paths()
  np.testing.assert_array_equal(other.flat_indices(), tracker.flat_indices())


def test_best_validation():
  rows = [{"epoch": 1, "val_acc": 0.5, "test_acc": 0.4}, {"epoch": 2, "val_acc": 0.7,
          "test_acc": 0.6}, {"epoch": 3, "val_acc": 0.7, "test_acc": 0.9}]
  s = metrics_io.best_validation(rows)
  assert (s["best_val_epoch"], s["test_acc_at_best_val"], s["test_acc_last"]) == (2, 0.6, 0.9)


def test_paper_report(tmp_path, capsys):
  """Equal epochs / gradient evaluations / seconds, best validation, Table 1."""

  def write(name, seed, method, evals_per_step, secs_per_epoch, epochs, tracked=False, bits=1):
    d = tmp_path / "grp" / f"{name}_s{seed}"
    d.mkdir(parents=True)
    cfg = {"method": method, "num_epochs": 2, "m": 5, "bits": bits, "track_weights": 10,
           "track_last_epochs": 1}
    (d / "config.json").write_text(json.dumps(cfg))
    rows = []
    for e in range(1, epochs + 1):
      r = {"epoch": e, "grad_evals": 10 * e * evals_per_step, "train_s": secs_per_epoch * e,
           "test_acc": 0.5 + 0.1 * e + 0.01 * seed, "val_acc": [0.6, 0.8, 0.7, 0.9][e - 1],
           "loss_diff_std": 0.1, "osc_flip_frequency": 0.01, "train_loss": 1.0 / e}
      if tracked:
        r.update(tw_window_steps=10, tw_amp_max=0.5, tw_amp_median=0.01, tw_flips_max=4,
                 tw_flips_mean=0.5, tw_flipped_frac=0.25, tw_top_amp=0.3)
      rows.append(r)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

  # Another example's runs in the same folder (no config.json) are not read.
  (tmp_path / "lm" / "laq_2bit_s0").mkdir(parents=True)
  (tmp_path / "lm" / "laq_2bit_s0" / "metrics.jsonl").write_text('{"step": 1}\n')
  for seed in (0, 1):
    write("laq", seed, "laq", 1, 1.0, 2, tracked=True)
    write("blaq", seed, "blaq", 2, 2.0, 2, tracked=True)
    write("laq-as-blaq", seed, "laq-as-blaq", 1, 1.0, 4)
  write("blaq-m", 0, "blaq-m", 1, 1.0, 1)                  # unfinished: left out
  report.main(["--runs", str(tmp_path), "--paper", "--configs", "grp"])
  out = capsys.readouterr().out
  assert "blaq-m" not in out
  lines = {}
  for l in out.splitlines():
    if l.startswith("| "):
      lines.setdefault(l.split("|")[1].strip(), l)     # the first table
  print(out)
  cells = lambda name: [c.strip() for c in lines[name].split("|")[2:-1]]
  # laq: best val at epoch 2 (acc 70 / 71), equal epochs = last, G = 20, T = 2 s.
  assert cells("laq")[3] == "70.50 ± 0.71" and cells("laq")[5] == "70.50 ± 0.71"
  # blaq at LAQ's 20 evaluations / 2 seconds: its first epoch.
  assert cells("blaq")[6] == "60.50 ± 0.71" and cells("blaq")[7] == "60.50 ± 0.71"
  # laq-as-blaq: 4 epochs; best validation at epoch 4; at 2 epochs its 2nd.
  assert cells("laq-as-blaq")[1] == "4" and cells("laq-as-blaq")[3] == "90.50 ± 0.71"
  assert cells("laq-as-blaq")[5] == "70.50 ± 0.71"
  assert cells("laq")[10] == "60.50 ± 0.71"                # accuracy after 1 epoch
  assert "max latent amplitude" in out and "| laq | 1 | 2 | 0.500 ± 0.000" in out
  assert cells("blaq")[12] == "4 ± 0"                     # training seconds per run
  assert "| blaq − laq | best val. | 0, 1 | +0.00, +0.00 | +0.000 | [+0.000, +0.000] |" in out
  assert "| blaq − laq-as-blaq | last | 0, 1 | -20.00, -20.00 | -20.000 |" in out
  # --plots draws the training loss (Fig. 5) and the accuracy curves per group.
  report.main(["--runs", str(tmp_path), "--paper", "--configs", "grp",
               "--plots", str(tmp_path / "plots")])
  assert (tmp_path / "plots" / "grp.png").stat().st_size > 0


def test_ablation_report(tmp_path, capsys):
  """The (m, a) grid, joined by the base group's blaq / blaq-m / laq at the same seeds."""

  def write(group, name, seed, method, m, a, acc):
    d = tmp_path / group / f"{name}_s{seed}"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"method": method, "num_epochs": 1, "m": m,
                                                "a": a}))
    row = {"epoch": 1, "grad_evals": 10, "train_s": 1.0, "test_acc": acc, "val_acc": 0.5}
    (d / "metrics.jsonl").write_text(json.dumps(row) + "\n")

  write("abl", "blaq-m_m10_a0.3", 0, "blaq-m", 10, 0.3, 0.91)
  write("base", "blaq-m", 0, "blaq-m", 5, 0.6, 0.95)
  write("base", "blaq-m", 1, "blaq-m", 5, 0.6, 0.10)     # a seed the grid lacks: left out
  write("base", "laq", 0, "laq", 5, 0.6, 0.93)
  report.main(["--runs", str(tmp_path), "--paper", "--configs", "ablation_x",
               "--ablation-base", "base"])
  assert capsys.readouterr().out == ""                   # no group of that name
  (tmp_path / "abl").rename(tmp_path / "ablation_x")
  report.main(["--runs", str(tmp_path), "--paper", "--configs", "ablation_x",
               "--ablation-base", "base"])
  rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| ")][1:]
  assert [r.split("|")[1:4] + r.split("|")[4:5] for r in rows] == [
      [" 5 ", " 0.6 ", " 1 ", " 95.00 "], [" 10 ", " 0.3 ", " 1 ", " 91.00 "],
      [" – ", " – ", " 1 ", " 93.00 "]]


def test_t_interval_matches_scipy():
  from scipy import stats

  for n in range(2, 12):
    assert abs(statistics.T975[n - 2] - stats.t.ppf(0.975, n - 1)) < 1e-3
  diffs = [0.3, -0.1, 0.5, 0.2]
  mean, low, high = statistics.t_interval(diffs)
  sem = np.std(diffs, ddof=1) / np.sqrt(len(diffs))
  ref = stats.t.interval(0.95, len(diffs) - 1, loc=np.mean(diffs), scale=sem)
  np.testing.assert_allclose([mean, low, high], [np.mean(diffs), *ref], atol=1e-3)
  mean, low, high = statistics.t_interval(np.arange(14.0))     # beyond the table: scipy's
  np.testing.assert_allclose(high - mean, stats.t.ppf(0.975, 13) * np.sqrt(17.5 / 14))
