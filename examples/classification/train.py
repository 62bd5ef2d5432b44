"""Training and evaluation of a low-bit classifier (fp, bwn-ste, laq, blaq).

``train_and_evaluate(config, workdir)`` is the whole program; ``main.py`` only
parses flags. Per epoch it writes one line of ``workdir/metrics.jsonl``
(test accuracy with the quantized weights, train loss, gradient evaluations,
training seconds excluding compilation and evaluation, oscillation
statistics), an orbax checkpoint in ``workdir/checkpoints`` (``resume=True``
continues from the latest one bit for bit: the data order is a function of ``(seed, epoch)`` and nothing else is
random), and at the end the bit-packed model (``model_packed.npz``), its size
report and a plot of accuracy per epoch / gradient evaluation / second.

Methods (``config.method``):

* ``fp``: Adam on full-precision weights (the reference).
* ``bwn-ste``: BWN with a straight-through gradient: Adam on latent weights,
  gradient taken at ``ŵ = mean|w| · sign(w)`` (``bits > 1``: the fitted
  k-bit uniform grid), latent weights clipped to [-1, 1].
* ``laq``: :func:`blaq_jax.laq`; ``ŵ = Q_D(w)`` with Adam's curvature.
* ``blaq``: :func:`blaq_jax.blaq` with ``config.a`` (two gradient evaluations
  per step).
* ``ste-dampen``, ``ste-freeze``, ``ste-alpha-blend``: BWN-STE with
  oscillation dampening (``config.dampen_weight``), iterative weight freezing
  (``config.freeze_threshold``) or alpha-blending (α from 0 to 1 over the
  first ``config.blend_end`` of training), Nagel et al. 2022 / Liu & Mattina
  2019; evaluated with the plain projection like ``bwn-ste``.
* ``blaq-periodic``, ``blaq-reuse``, ``blaq-model``: the cheaper lookahead
  forms of ``blaq_jax.contrib`` (lookahead every ``config.every``
  steps; the trial gradient reused as the next step's gradient; the trial
  gradient predicted by the quadratic model). ``blaq-reuse`` takes its one
  gradient (and the batch-norm statistics and loss it logs) at the trial
  weights.

Oscillation statistics (the analogue of the BLAQ paper's Table 1) come from
:func:`blaq_jax.track_oscillations` chained after the optimizer with a window
of one epoch, so each row reports the epoch just finished: ``osc_flip_frequency``
(code flips of the quantized weights per weight per step), ``osc_amplitude_mean``
/ ``osc_amplitude_max`` (peak-to-peak range of the latent weights),
``osc_max_weight_flips`` and ``osc_cosine`` (between the last two updates). For
``fp`` the codes are those of the plain projection of the fp weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import blaq_jax as bq
import blaq_jax.contrib as bq_contrib
from examples.classification import input_pipeline
from examples.classification import models

METHODS = ("fp", "bwn-ste", "laq", "blaq", "blaq-periodic", "blaq-reuse", "blaq-model",
           "ste-dampen", "ste-freeze", "ste-alpha-blend")
STE_FAMILY = ("bwn-ste", "ste-dampen", "ste-freeze", "ste-alpha-blend")
LOSS_AWARE = ("laq", "blaq", "blaq-periodic", "blaq-reuse", "blaq-model")


@dataclasses.dataclass
class Config:
  """Everything a run depends on (``configs/*.py`` return one)."""

  dataset: str = "mnist"
  model: str = "mlp"
  model_kwargs: dict = dataclasses.field(default_factory=dict)
  method: str = "blaq"
  bits: int = 1
  scheme: str = "linear"
  per_channel: bool = False
  a: float = 0.6            # BLAQ's mixing weight
  every: int = 10           # blaq-periodic: lookahead every this many steps
  dampen_weight: float = 1e-2     # ste-dampen: lambda of Nagel et al.'s regulariser
  freeze_threshold: float = 0.02  # ste-freeze: EMA flip frequency above which weights freeze
  blend_end: float = 0.5          # ste-alpha-blend: alpha reaches 1 at this fraction of training
  learning_rate: float = 1e-3
  lr_schedule: str = "cosine"   # "cosine" (to 0 over num_epochs) or "constant"
  num_epochs: int = 10
  batch_size: int = 100
  eval_batch_size: int = 1000
  seed: int = 0
  train_subset: Optional[int] = None   # first n training examples only
  test_subset: Optional[int] = None
  augment: Optional[str] = None        # "crop_flip" for CIFAR
  data_dir: Optional[str] = None
  download: bool = False
  stop_after_epoch: Optional[int] = None   # stop early (the schedule still spans num_epochs)
  checkpoint: bool = True
  export: bool = True
  plot: bool = True
  progress: bool = True

  def validate(self):
    if self.method not in METHODS:
      raise ValueError(f"config.method must be one of {METHODS}, got {self.method!r}")
    if self.dataset not in input_pipeline.DATASETS:
      raise ValueError(f"config.dataset must be one of {input_pipeline.DATASETS}, "
                       f"got {self.dataset!r}")
    if self.model not in models.MODELS:
      raise ValueError(f"config.model must be one of {sorted(models.MODELS)}, "
                       f"got {self.model!r}")
    if not 0 <= self.a <= 1:
      raise ValueError(f"config.a must be in [0, 1], got {self.a}")
    if self.lr_schedule not in ("cosine", "constant"):
      raise ValueError(f"config.lr_schedule must be 'cosine' or 'constant', "
                       f"got {self.lr_schedule!r}")
    for name in ("num_epochs", "batch_size", "eval_batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"config.{name} must be >= 1, got {getattr(self, name)}")
    return self


# ----------------------------------------------------------------------------
# Data


def load_data(config: Config):
  """Normalised float32 train/test arrays (subsets applied)."""
  data = input_pipeline.load(config.dataset, config.data_dir, config.download)
  out = {}
  for split, subset in (("train", config.train_subset), ("test", config.test_subset)):
    x, y = data[split]
    if subset is not None:
      x, y = x[:subset], y[:subset]
    out[split] = (input_pipeline.normalize(config.dataset, x), y)
  return out


# ----------------------------------------------------------------------------
# Model, optimizer and the jitted steps


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def build_model(config: Config, image_shape):
  kwargs = dict(config.model_kwargs)
  h, w, c = image_shape
  if config.model == "mlp":
    kwargs.setdefault("in_features", h * w * c)
  else:
    kwargs.setdefault("in_channels", c)
    kwargs.setdefault("image_size", h)
  return models.create_model(config.model, seed=config.seed, **kwargs)


def make_schedule(config: Config, steps_per_epoch: int):
  if config.lr_schedule == "constant":
    return config.learning_rate
  return optax.cosine_decay_schedule(config.learning_rate, config.num_epochs * steps_per_epoch)


def make_optimizer(config: Config, spec, schedule, steps_per_epoch: int):
  """The method's optimizer, chained with the oscillation tracker (window: one epoch)."""
  if config.method == "fp":
    tx = optax.adam(schedule)
  elif config.method == "bwn-ste":
    tx = bq.ste(optax.adam(schedule), spec)
  elif config.method == "ste-dampen":
    tx = optax.chain(bq.add_oscillation_dampening(config.dampen_weight, spec),
                     bq.ste(optax.adam(schedule), spec))
  elif config.method == "ste-freeze":
    tx = optax.chain(bq.ste(optax.adam(schedule), spec),
                     bq.freeze_oscillations(config.freeze_threshold, spec))
  elif config.method == "ste-alpha-blend":
    tx = bq.ste(optax.adam(schedule), spec)
  elif config.method == "laq":
    tx = bq.laq(schedule, spec)
  elif config.method == "blaq":
    tx = bq.blaq(schedule, spec, a=config.a)
  elif config.method == "blaq-periodic":
    tx = bq.blaq(schedule, spec, a=config.a,
                 lookahead_schedule=bq.periodic_lookahead(config.every, phase=0))
  elif config.method == "blaq-reuse":
    tx = bq_contrib.blaq_reuse(schedule, spec, a=config.a)
  else:
    tx = bq_contrib.blaq_model(schedule, spec, a=config.a)
  return optax.chain(tx, bq.track_oscillations(spec, window=steps_per_epoch))


def grad_evals(config: Config, steps: int) -> int:
  """Gradient evaluations spent by ``steps`` training steps."""
  if config.method == "blaq":
    return 2 * steps
  if config.method == "blaq-periodic":  # lookahead on steps 0, every, 2 every, ...
    return steps + -(-steps // config.every)
  return steps


class Trainer:
  """Holds the model structure, spec and jitted steps of one run."""

  def __init__(self, config: Config, image_shape, steps_per_epoch: int):
    self.config = config
    model = build_model(config, image_shape)
    self.graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    self.spec = bq.quant_spec(params, bits=config.bits, scheme=config.scheme,
                              per_channel=config.per_channel)
    self.schedule = make_schedule(config, steps_per_epoch)
    self.blend_schedule = bq.alpha_blending_schedule(
        0, max(1, int(config.blend_end * config.num_epochs * steps_per_epoch)))
    self.tx = make_optimizer(config, self.spec, self.schedule, steps_per_epoch)
    self.init_state = {
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": self.tx.init(params),
    }
    self.train_step = jax.jit(self._train_step)
    self.eval_step = jax.jit(self._eval_step)
    # Eager (once per epoch): op-by-op evaluation gives exactly the values of
    # bq.quantize_params, which the packed export reproduces bit for bit.
    self.quantized = self._quantized

  def curvature(self, opt_state):
    """``D`` for laq/blaq; None (``D = 1``) otherwise."""
    if self.config.method in LOSS_AWARE:
      return bq.curvature(opt_state)
    return None

  def _quantized(self, params, opt_state):
    """The weights the forward pass uses (``ŵ``; ``w`` itself for fp)."""
    if self.config.method == "fp":
      return params
    if self.config.method in STE_FAMILY:
      # BWN: the plain projection (mean|w| sign(w) at 1 bit), exactly; the
      # gradient is taken at these values, so no straight-through wrapper.
      return bq.quantize_params(params, self.spec)
    return bq.quantize_params(params, self.spec, state=opt_state)

  def _loss(self, params, batch_stats, x, y):
    model = nnx.merge(self.graphdef, params, batch_stats, copy=True)
    logits = model(x, train=True)
    return _cross_entropy(logits, y), (nnx.state(model, nnx.BatchStat), logits)

  def _train_step(self, state, x, y, step):
    params, batch_stats, opt_state = state["params"], state["batch_stats"], state["opt_state"]
    if self.config.method == "blaq-reuse":
      # One gradient, at the trial weights; its loss and statistics are logged.
      trial = []

      def grad_fn(p):
        (loss, aux), g = jax.value_and_grad(self._loss, has_aux=True)(p, batch_stats, x, y)
        trial.append((loss, aux))
        return g

      updates, opt_state = self.tx.update(optax.tree.zeros_like(params), opt_state, params,
                                          grad_fn=grad_fn)
      loss, (new_stats, logits) = trial[0]
    elif self.config.method == "ste-alpha-blend":
      # Forward (1-α) w + α sg(Q(w)); the gradient flows to w through (1-α) w.
      alpha = self.blend_schedule(step)
      blended = lambda p: self._loss(bq.alpha_blend_params(p, self.spec, alpha), batch_stats, x, y)
      (loss, (new_stats, logits)), grads = jax.value_and_grad(blended, has_aux=True)(params)
      updates, opt_state = self.tx.update(grads, opt_state, params)
    else:
      q = self._quantized(params, opt_state)
      (loss, (new_stats, logits)), grads = jax.value_and_grad(self._loss, has_aux=True)(
          q, batch_stats, x, y)
      grad_fn = lambda p: jax.grad(self._loss, has_aux=True)(p, batch_stats, x, y)[0]
      updates, opt_state = self.tx.update(grads, opt_state, params, grad_fn=grad_fn)
    params = optax.apply_updates(params, updates)
    correct = jnp.sum(jnp.argmax(logits, -1) == y)
    new_state = {"params": params, "batch_stats": new_stats, "opt_state": opt_state}
    return new_state, loss, correct

  def _eval_step(self, qparams, batch_stats, x, y):
    model = nnx.merge(self.graphdef, qparams, batch_stats)
    logits = model(x, train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(losses), jnp.sum(jnp.argmax(logits, -1) == y)

  def evaluate(self, state, images, labels):
    """(mean loss, accuracy) of the quantized model on ``images``."""
    q = self.quantized(state["params"], state["opt_state"])
    loss = correct = 0.0
    for x, y in input_pipeline.eval_batches(images, labels, self.config.eval_batch_size):
      l, c = self.eval_step(q, state["batch_stats"], x, y)
      loss, correct = loss + l, correct + c
    n = len(images)
    return float(loss) / n, float(correct) / n

  def osc_stats(self, state):
    """Oscillation statistics of the last epoch, all quantized leaves together."""
    stats = jax.device_get(bq.oscillation_stats(state["opt_state"]))
    return {k.replace("all/", "osc_"): float(v) for k, v in stats.items()
            if k.startswith("all/")}


# ----------------------------------------------------------------------------
# Checkpoints (orbax): the state's leaves, in tree order, plus a JSON sidecar.


def _checkpointer():
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer()


def save_checkpoint(workdir: Path, state, meta: dict) -> None:
  ckpt_dir = workdir / "checkpoints"
  ckpt_dir.mkdir(parents=True, exist_ok=True)
  epoch = meta["epoch"]
  leaves = {f"{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))}
  path = (ckpt_dir / f"epoch_{epoch}").resolve()
  if path.exists():
    shutil.rmtree(path)
  ckptr = _checkpointer()
  ckptr.save(path, leaves)
  ckptr.wait_until_finished()
  (ckpt_dir / f"epoch_{epoch}.json").write_text(json.dumps(meta))
  for old in ckpt_dir.glob("epoch_*.json"):  # keep the latest only
    e = int(old.stem.split("_")[1])
    if e < epoch:
      old.unlink()
      shutil.rmtree(ckpt_dir / f"epoch_{e}", ignore_errors=True)


def latest_checkpoint(workdir: Path) -> Optional[int]:
  metas = sorted(int(p.stem.split("_")[1]) for p in (workdir / "checkpoints").glob("epoch_*.json")
                 if (workdir / "checkpoints" / p.stem).is_dir())
  return metas[-1] if metas else None


def restore_checkpoint(workdir: Path, epoch: int, like):
  path = (workdir / "checkpoints" / f"epoch_{epoch}").resolve()
  leaves, treedef = jax.tree.flatten(like)
  target = {f"{i:05d}": np.zeros(np.shape(x), np.asarray(x).dtype) for i, x in enumerate(leaves)}
  restored = _checkpointer().restore(path, target)
  new = [jnp.asarray(restored[f"{i:05d}"], dtype=np.asarray(x).dtype)
         for i, x in enumerate(leaves)]
  meta = json.loads((workdir / "checkpoints" / f"epoch_{epoch}.json").read_text())
  return jax.tree.unflatten(treedef, new), meta


# ----------------------------------------------------------------------------


def _read_metrics(path: Path, upto_epoch: int) -> list[dict]:
  if not path.exists():
    return []
  rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
  return [r for r in rows if r["epoch"] <= upto_epoch]


def train_and_evaluate(config: Config, workdir, resume: bool = False) -> dict:
  """Trains ``config`` writing into ``workdir``; returns the final metrics row."""
  config.validate()
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
  data = load_data(config)
  train_x, train_y = data["train"]
  test_x, test_y = data["test"]
  steps_per_epoch = len(train_x) // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"config.batch_size {config.batch_size} > {len(train_x)} training examples")
  trainer = Trainer(config, train_x.shape[1:], steps_per_epoch)
  state = trainer.init_state
  metrics_path = workdir / "metrics.jsonl"
  # Compile before the clock starts: train_s counts training, not compilation.
  x0, y0 = next(iter(input_pipeline.train_batches(train_x, train_y, config.batch_size,
                                                  config.seed, 1, config.augment)))
  trainer.train_step = trainer.train_step.lower(state, x0, y0, 0).compile()

  start_epoch, step, train_s = 0, 0, 0.0
  last = latest_checkpoint(workdir) if resume else None
  if last is not None:
    state, meta = restore_checkpoint(workdir, last, state)
    start_epoch, step, train_s = meta["epoch"], meta["step"], meta["train_s"]
    print(f"resumed from epoch {start_epoch} (step {step})")
  rows = _read_metrics(metrics_path, start_epoch)
  metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))

  end_epoch = config.num_epochs
  if config.stop_after_epoch is not None:
    end_epoch = min(end_epoch, config.stop_after_epoch)
  row = rows[-1] if rows else {}
  for epoch in range(start_epoch + 1, end_epoch + 1):
    batches = input_pipeline.train_batches(train_x, train_y, config.batch_size,
                                           config.seed, epoch, config.augment)
    if config.progress:
      from tqdm import tqdm
      batches = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch}", leave=False,
                     mininterval=2.0)
    t0 = time.perf_counter()
    losses, corrects = [], []
    for x, y in batches:
      state, loss, correct = trainer.train_step(state, x, y, step)
      losses.append(loss)
      corrects.append(correct)
      step += 1
    train_loss = float(jnp.mean(jnp.stack(losses)))
    train_acc = float(jnp.sum(jnp.stack(corrects))) / (steps_per_epoch * config.batch_size)
    jax.block_until_ready(state)
    train_s += time.perf_counter() - t0
    test_loss, test_acc = trainer.evaluate(state, test_x, test_y)
    lr = trainer.schedule(step) if callable(trainer.schedule) else trainer.schedule
    row = {
        "epoch": epoch, "step": step, "grad_evals": grad_evals(config, step),
        "train_s": round(train_s, 3), "train_loss": train_loss, "train_acc": train_acc,
        "test_loss": test_loss, "test_acc": test_acc, "lr": float(lr),
        **trainer.osc_stats(state),
    }
    with open(metrics_path, "a") as f:
      f.write(json.dumps(row) + "\n")
    print(f"epoch {epoch}: loss {train_loss:.4f} test_acc {test_acc:.4f} "
          f"flip_freq {row['osc_flip_frequency']:.2e} ({train_s:.1f}s)", flush=True)
    if config.checkpoint:
      save_checkpoint(workdir, state, {"epoch": epoch, "step": step, "train_s": train_s})

  if end_epoch == config.num_epochs:
    if config.export:
      export_model(trainer, state, workdir)
    if config.plot:
      plot_metrics(metrics_path, workdir / "accuracy.png", title=f"{config.dataset} "
                   f"{config.model} {config.method} {config.bits}-bit")
  return {"state": state, "metrics": row, "trainer": trainer}


def export_model(trainer: Trainer, state, workdir: Path) -> None:
  """Writes ``model_packed.npz`` (bit-packed ``ŵ``) and ``size_report.txt``."""
  cfg = trainer.config
  params = state["params"]
  if cfg.method == "fp":
    packed = bq.pack(params, jax.tree.map(lambda _: None, params))
  elif cfg.method in STE_FAMILY:
    packed = bq.pack(params, trainer.spec)
  else:
    packed = bq.pack(params, trainer.spec, state=state["opt_state"])
  bq.save_packed(workdir / "model_packed.npz", packed)
  lines = []
  bq.size_report(packed, print_fn=lines.append)
  (workdir / "size_report.txt").write_text("\n".join(lines) + "\n")
  print(lines[-1])


def plot_metrics(metrics_paths, out_path, title: str = "", labels=None) -> None:
  """Test accuracy per epoch, per gradient evaluation and per second."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if isinstance(metrics_paths, (str, Path)):
    metrics_paths = [metrics_paths]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for i, path in enumerate(metrics_paths):
    rows = [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
    label = labels[i] if labels else None
    acc = [100 * r["test_acc"] for r in rows]
    for ax, key in zip(axes, ("epoch", "grad_evals", "train_s")):
      ax.plot([r[key] for r in rows], acc, marker="o", ms=3, label=label)
  for ax, xl in zip(axes, ("epoch", "gradient evaluations", "training seconds")):
    ax.set_xlabel(xl)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
  if labels:
    axes[0].legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
