"""Training and evaluation of a low-bit classifier (fp, bwn-ste, laq, blaq).

``train_and_evaluate(config, workdir)`` is the whole program; ``main.py`` only
parses flags. Per epoch it writes one line of ``workdir/metrics.jsonl``
(test accuracy with the quantized weights, validation accuracy when
``config.val_split`` holds out the end of the training set, train loss and its
step-to-step fluctuation, gradient evaluations, training seconds excluding
compilation and evaluation, oscillation statistics), an orbax checkpoint in
``workdir/checkpoints`` (``examples/checkpointing.py``: running the same config
again continues from the latest one bit for bit, the data order being a
function of ``(seed, epoch)`` and nothing else random; another config is
refused unless ``fresh`` or ``force``), and at the end the bit-packed model
with its batch-norm statistics (``model_packed.npz``, which
:func:`evaluate_packed` serves: ``main.py --eval-packed``), its size report and
a plot of accuracy per epoch / gradient evaluation / second.

Methods (``config.method``):

* ``fp``: Adam on full-precision weights (the reference).
* ``bwn-ste``: BWN with a straight-through gradient: Adam on latent weights,
  gradient taken at ``ŵ = mean|w| · sign(w)`` (``bits > 1``: the fitted
  k-bit uniform grid), latent weights clipped to [-1, 1].
* ``laq``: :func:`blaq_jax.laq`; ``ŵ = Q_D(w)`` with Adam's curvature.
* ``blaq``: :func:`blaq_jax.blaq` with ``config.a``, the two-stage update on
  every step (two gradient evaluations per step).
* ``blaq-m``: BLAQ as the paper runs it: the two-stage update during one epoch
  in every ``config.m`` epochs (``bq.periodic_lookahead(m, steps_per_epoch,
  phase=config.lookahead_phase)``; default phase ``m - 1``, "after every m
  epochs") and LAQ bit for bit in the others; ``1 + 1/m`` gradient evaluations
  per step on average.
* ``laq-as-blaq``, ``laq-as-blaq-m``: LAQ trained for as many gradient
  evaluations as ``blaq`` / ``blaq-m`` spend: ``2×`` / ``(1 + 1/m)×``
  ``config.num_epochs`` epochs, the learning-rate schedule stretched by the same
  factor (milestones, decay periods and the cosine horizon scale with it).
* ``ste-dampen``, ``ste-freeze``, ``ste-alpha-blend``: BWN-STE with
  oscillation dampening (``config.dampen_weight``), iterative weight freezing
  (``config.freeze_threshold``) or alpha-blending (α from 0 to 1 over the
  first ``config.blend_end`` of training), Nagel et al. 2022 / Liu & Mattina
  2019; evaluated with the plain projection like ``bwn-ste``.
* ``blaq-reuse``, ``blaq-model``: the cheaper lookahead forms of
  ``blaq_jax.contrib`` (the trial gradient reused as the next
  step's gradient; the trial gradient predicted by the quadratic model).
  ``blaq-reuse`` takes its one gradient (and the batch-norm statistics and
  loss it logs) at the trial weights.

Oscillation statistics (the analogue of the BLAQ paper's Table 1) come from
:func:`blaq_jax.track_oscillations` chained after the optimizer with a window
of one epoch, so each row reports the epoch just finished: ``osc_flip_frequency``
(code flips of the quantized weights per weight per step), ``osc_amplitude_mean``
/ ``osc_amplitude_max`` (peak-to-peak range of the latent weights),
``osc_max_weight_flips`` and ``osc_cosine`` (between the last two updates). For
``fp`` the codes are those of the plain projection of the fp weights.

Per-weight tracking (the paper's Table 1 follows "the same locked weight"):
``config.track_weights = n`` follows ``n`` weights drawn uniformly (by
``config.seed``) from all quantized kernels. Each jitted step returns their
latent values ``w_t`` and the code indices of their quantized values ``ŵ_t``
(the weights that step's forward pass used); the host keeps the last
``config.track_last_epochs`` epochs. Each metrics row then gives, over that
window and per sampled weight, the peak-to-peak range of the latent weight
(``tw_amp_*``, max / median over the sample) and the number of changes of its
code (``tw_flips_*``), and ``tw_top_flips`` / ``tw_top_amp`` for the sampled
weight that flips most. The sample is the same for every method at a given
seed and model, so LAQ and BLAQ rows describe the same weights; the traces
are saved in ``tracked_weights.npz``. The code index is that of ``ŵ/α`` in
the code book, with ``α`` the largest ``|ŵ|`` of the weight's scale group,
exact whenever the group uses its top code (always at 1 bit);
``tw_grid_mismatch`` counts sampled values off that grid (0 when exact).

Losses: ``config.loss = "cross_entropy"`` or ``"squared_hinge"`` (the "L2-SVM"
output of BinaryConnect / LAB / BLAQ, ``mean(max(0, 1 - t·y)²)`` over the batch
and the classes with ``t = ±1``). ``loss_diff_std`` is the standard deviation of
the step-to-step differences of the training loss within the epoch (a number
for the paper's Fig. 5 claim that LAQ's loss fluctuates more);
``step_losses.jsonl`` has every step's loss.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import blaq_jax as bq
from examples import checkpointing
from examples import config_cli
from examples import methods
from examples import metrics_io
from examples.classification import input_pipeline
from examples.classification import models

METHODS = tuple(methods.METHODS)
LOSSES = ("cross_entropy", "squared_hinge")
LR_SCHEDULES = ("cosine", "constant", "step", "step_every", "exponential")


def method_options(config, steps_per_epoch: int = 1) -> methods.Options:
  """The method hyper-parameters of ``config`` (a Config or its dict)."""
  g = lambda name: _get(config, name)
  return methods.Options(
      a=g("a"), m=g("m"), lookahead_phase=g("lookahead_phase"),
      steps_per_epoch=steps_per_epoch, dampen_weight=g("dampen_weight"),
      freeze_threshold=g("freeze_threshold"),
      blend_steps=max(1, int(g("blend_end") * g("num_epochs") * steps_per_epoch)))


def epoch_scale(config) -> float:
  """Run length / ``num_epochs``: > 1 for the LAQ runs at BLAQ's gradient budget."""
  return methods.get(_get(config, "method")).run_scale(method_options(config))


def run_epochs(config) -> int:
  """Epochs the run trains for (``config`` may be a Config or its dict)."""
  return max(1, int(round(_get(config, "num_epochs") * epoch_scale(config))))


def _get(config, name):
  return config[name] if isinstance(config, dict) else getattr(config, name)


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
  m: int = 5                # blaq-m: the two-stage update in one epoch of every m
  lookahead_phase: int | None = None   # blaq-m: which epoch of each period (None: m-1)
  dampen_weight: float = 1e-2     # ste-dampen: lambda of Nagel et al.'s regulariser
  freeze_threshold: float = 0.02  # ste-freeze: EMA flip frequency above which weights freeze
  blend_end: float = 0.5          # ste-alpha-blend: alpha reaches 1 at this fraction of training
  loss: str = "cross_entropy"   # or "squared_hinge" (±1 targets, the paper's L2-SVM)
  learning_rate: float = 1e-3
  # "cosine" (to 0 over the run), "constant", "step" (×lr_decay at each epoch of
  # lr_milestones), "step_every" (×lr_decay every lr_decay_every epochs),
  # "exponential" (×lr_decay per epoch). Epochs are scaled by epoch_scale().
  lr_schedule: str = "cosine"
  lr_milestones: tuple = ()
  lr_decay: float = 0.1
  lr_decay_every: int = 5
  schedule_reading: str | None = None   # paper_* configs: "reference" or "appendix"
  num_epochs: int = 10
  batch_size: int = 100
  eval_batch_size: int = 1000
  seed: int = 0
  train_subset: int | None = None   # first n training examples only
  test_subset: int | None = None
  val_split: int = 0                   # hold out the last n training examples (validation)
  track_weights: int = 0               # follow this many sampled quantized weights
  track_last_epochs: int = 1           # ... over a window of this many epochs
  augment: str | None = None        # "crop_flip" for CIFAR
  data_dir: str | None = None
  download: bool = False
  stop_after_epoch: int | None = None   # stop early (the schedule still spans num_epochs)
  checkpoint: bool = True
  export: bool = True
  plot: bool = True
  progress: bool = True
  max_consecutive_skips: int = 50   # stop when this many steps in a row were skipped

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
    if self.lr_schedule not in LR_SCHEDULES:
      raise ValueError(f"config.lr_schedule must be one of {LR_SCHEDULES}, "
                       f"got {self.lr_schedule!r}")
    if self.loss not in LOSSES:
      raise ValueError(f"config.loss must be one of {LOSSES}, got {self.loss!r}")
    for name in ("num_epochs", "batch_size", "eval_batch_size", "m", "lr_decay_every",
                 "track_last_epochs"):
      if getattr(self, name) < 1:
        raise ValueError(f"config.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("val_split", "track_weights"):
      if getattr(self, name) < 0:
        raise ValueError(f"config.{name} must be >= 0, got {getattr(self, name)}")
    if self.lookahead_phase is not None and not 0 <= self.lookahead_phase < self.m:
      raise ValueError(f"config.lookahead_phase must be in [0, m) = [0, {self.m}), "
                       f"got {self.lookahead_phase}")
    check = config_cli.check_number
    check(self, "learning_rate", lo=0)
    check(self, "a", lo=0, hi=1)
    check(self, "bits", lo=1, hi=8, integer=True)
    check(self, "seed", lo=0, integer=True)
    for name in ("train_subset", "test_subset", "stop_after_epoch"):
      check(self, name, lo=1, integer=True, none_ok=True)
    check(self, "max_consecutive_skips", lo=1, integer=True)
    for name in ("dampen_weight", "freeze_threshold"):
      check(self, name, lo=0)
    check(self, "blend_end", lo=0, hi=1, lo_open=True)
    check(self, "lr_decay", lo=0, lo_open=True)
    config_cli.check_choice(self, "scheme", ("linear", "log", "ternary"))
    config_cli.check_choice(self, "augment", (None, "crop_flip"))
    config_cli.check_kwargs(self, "model_kwargs", models.MODELS[self.model])
    return self


# ----------------------------------------------------------------------------
# Data


def load_data(config: Config):
  """Normalised float32 train/test (and "val") arrays (subsets applied).

  ``config.val_split = n`` holds out the last ``n`` training examples (after
  ``train_subset``) as the validation set, as the reference code does (MNIST:
  50k / 10k, CIFAR-10: 45k / 5k).
  """
  data = input_pipeline.load(config.dataset, config.data_dir, config.download)
  out = {}
  for split, subset in (("train", config.train_subset), ("test", config.test_subset)):
    x, y = data[split]
    if subset is not None:
      x, y = x[:subset], y[:subset]
    check_labels(y, config.model_kwargs.get("num_classes", 10), f"{config.dataset} {split}")
    out[split] = (input_pipeline.normalize(config.dataset, x), y)
  if config.val_split:
    x, y = out["train"]
    if config.val_split >= len(x):
      raise ValueError(f"config.val_split {config.val_split} leaves no training examples "
                       f"of {len(x)}")
    cut = len(x) - config.val_split
    out["train"], out["val"] = (x[:cut], y[:cut]), (x[cut:], y[cut:])
  return out


def check_labels(labels, num_classes: int, what: str) -> None:
  """Labels must be integers in ``[0, num_classes)`` (an out-of-range label
  gives a NaN loss, not an error, inside the jitted step)."""
  labels = np.asarray(labels)
  if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0
                      or labels.max() >= num_classes):
    raise ValueError(f"{what}: labels must be integers in [0, {num_classes}), found "
                     f"{labels.min()}..{labels.max()} ({labels.dtype}); fix the data or set "
                     "model_kwargs num_classes")


# ----------------------------------------------------------------------------
# Model, optimizer and the jitted steps


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def per_example_loss(name: str, logits, labels):
  """Per-example loss: cross-entropy, or squared hinge averaged over classes."""
  if name == "squared_hinge":
    t = 2.0 * jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype) - 1.0
    return jnp.mean(jnp.square(jax.nn.relu(1.0 - t * logits)), axis=-1)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


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
  """The learning rate per step; epochs (milestones, periods) scale with epoch_scale()."""
  lr, scale = config.learning_rate, epoch_scale(config)
  epoch_steps = lambda epochs: max(1, int(round(epochs * scale * steps_per_epoch)))
  if config.lr_schedule == "constant":
    return lr
  if config.lr_schedule == "step":
    return optax.piecewise_constant_schedule(
        lr, {epoch_steps(e): config.lr_decay for e in config.lr_milestones})
  if config.lr_schedule == "step_every":
    return optax.exponential_decay(lr, epoch_steps(config.lr_decay_every), config.lr_decay,
                                   staircase=True)
  if config.lr_schedule == "exponential":
    return optax.exponential_decay(lr, epoch_steps(1), config.lr_decay, staircase=True)
  return optax.cosine_decay_schedule(lr, run_epochs(config) * steps_per_epoch)


def make_optimizer(config: Config, spec, schedule, steps_per_epoch: int):
  """The method's optimizer, chained with the oscillation tracker (window: one
  epoch); the state is ``(method's state, tracker's state)``."""
  tx = methods.get(config.method).optimizer(schedule, spec,
                                            method_options(config, steps_per_epoch))
  return optax.chain(tx, bq.track_oscillations(spec, window=steps_per_epoch))


def grad_evals(config: Config, steps: int, steps_per_epoch: int = 1) -> int:
  """Gradient evaluations spent by ``steps`` training steps."""
  options = method_options(config, steps_per_epoch)
  return methods.get(config.method).grad_evals(options, steps)


class WeightTracker:
  """Follows ``n`` weights sampled (by ``seed``) from the quantized kernels.

  :meth:`gather` (inside the jitted step) returns their latent values and the
  code-book indices of their quantized values; :meth:`window_stats` turns the
  host-side traces of a window into the Table 1 figures.
  """

  def __init__(self, params, spec, n: int, seed: int):
    flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_s = jax.tree.leaves(spec, is_leaf=lambda x: x is None or isinstance(x, bq.QuantSpec))
    self.size = 0
    self.leaves = []          # (leaf index, path, spec, shape, flat indices)
    if n <= 0:
      return
    cands = [(i, jax.tree_util.keystr(path, simple=True, separator="/"), s, np.shape(w))
             for i, ((path, w), s) in enumerate(zip(flat_p, flat_s)) if s is not None]
    sizes = np.array([int(np.prod(shape)) for *_, shape in cands])
    total = int(sizes.sum())
    if total == 0:
      return
    rng = np.random.default_rng([seed, 13])
    picks = np.sort(rng.choice(total, size=min(n, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for k, (i, path, s, shape) in enumerate(cands):
      idx = picks[(picks >= starts[k]) & (picks < starts[k + 1])] - starts[k]
      if len(idx):
        self.leaves.append((i, path, s, shape, idx.astype(np.int32)))
    self.size = sum(len(l[-1]) for l in self.leaves)

  def paths(self) -> list[str]:
    return [path for _, path, _, _, idx in self.leaves for _ in idx]

  def flat_indices(self) -> np.ndarray:
    return np.concatenate([idx for *_, idx in self.leaves])

  def gather(self, params, qparams):
    """``(w [n], codes [n] int32, off_grid [n] bool)`` of the sampled weights."""
    pw, qw = jax.tree.leaves(params), jax.tree.leaves(qparams)
    ws, codes, off = [], [], []
    for i, _, spec, _, idx in self.leaves:
      w, q = pw[i].reshape(-1), qw[i].astype(jnp.float32)
      axes = tuple(range(q.ndim - 1)) if spec.per_channel else tuple(range(q.ndim))
      alpha = jnp.max(jnp.abs(q), axis=axes, keepdims=True)
      alpha = jnp.broadcast_to(alpha, q.shape).reshape(-1)[idx]
      ratio = q.reshape(-1)[idx] / jnp.where(alpha > 0, alpha, 1.0)
      book = jnp.asarray(spec.codebook(), jnp.float32)
      dist = jnp.abs(ratio[:, None] - book[None, :])
      code = jnp.argmin(dist, axis=1).astype(jnp.int32)
      ws.append(w[idx])
      codes.append(code)
      off.append(jnp.min(dist, axis=1) > 1e-3)
    return jnp.concatenate(ws), jnp.concatenate(codes), jnp.concatenate(off)

  @staticmethod
  def window_stats(w: np.ndarray, codes: np.ndarray, off: np.ndarray) -> dict:
    """Table 1 figures over a window: ``w``, ``codes`` of shape ``[steps, n]``."""
    amp = w.max(0) - w.min(0)                         # peak-to-peak per weight
    flips = np.count_nonzero(np.diff(codes, axis=0), axis=0)
    top = int(np.argmax(flips))
    return {
        "tw_window_steps": int(w.shape[0]),
        "tw_amp_max": float(amp.max()), "tw_amp_median": float(np.median(amp)),
        "tw_amp_mean": float(amp.mean()),
        "tw_flips_max": int(flips.max()), "tw_flips_mean": float(flips.mean()),
        "tw_flips_median": float(np.median(flips)),
        "tw_flipped_frac": float(np.mean(flips > 0)),
        "tw_top_flips": int(flips[top]), "tw_top_amp": float(amp[top]),
        "tw_grid_mismatch": int(np.count_nonzero(off)),
    }


class Trainer:
  """Holds the model structure, spec and jitted steps of one run."""

  def __init__(self, config: Config, image_shape, steps_per_epoch: int):
    self.config = config
    self.method = methods.get(config.method)
    self.options = method_options(config, steps_per_epoch)
    model = build_model(config, image_shape)
    self.graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    self.spec = bq.quant_spec(params, bits=config.bits, scheme=config.scheme,
                              per_channel=config.per_channel)
    self.schedule = make_schedule(config, steps_per_epoch)
    self.tx = make_optimizer(config, self.spec, self.schedule, steps_per_epoch)
    self.tracker_tx = bq.track_oscillations(self.spec, window=steps_per_epoch)
    self.init_state = {
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": self.tx.init(params),
    }
    self.tracker = WeightTracker(params, self.spec, config.track_weights, config.seed)
    # One compiled step per value of `lookahead` (blaq-m's off steps are LAQ's).
    self.train_step = jax.jit(self._train_step, static_argnames="lookahead")
    self.eval_step = jax.jit(self._eval_step)
    # Eager (once per epoch): op-by-op evaluation gives exactly the values of
    # bq.quantize_params, which the packed export reproduces bit for bit.
    self.quantized = self._quantized

  def _quantized(self, params, opt_state):
    """The weights the forward pass uses (``ŵ``; ``w`` itself for fp)."""
    return self.method.weights(params, self.spec, opt_state)

  def _loss(self, params, batch_stats, x, y):
    model = nnx.merge(self.graphdef, params, batch_stats, copy=True)
    logits = model(x, train=True)
    loss = jnp.mean(per_example_loss(self.config.loss, logits, y))
    return loss, (nnx.state(model, nnx.BatchStat), logits)

  def _train_step(self, state, x, y, step, lookahead=True):
    params, batch_stats, opt_state = state["params"], state["batch_stats"], state["opt_state"]
    updates, opt_state, loss, (new_stats, logits) = self.method.step(
        self.tx, self.spec, params, opt_state, lambda p: self._loss(p, batch_stats, x, y),
        count=step, options=self.options, lookahead=lookahead)
    tracked = None
    if self.tracker.size:
      # The codes of ŵ_t (for fp: of the plain projection of its weights).
      q = (self._quantized(params, state["opt_state"]) if self.method.quantized
           else bq.quantize_params(params, self.spec))
      tracked = self.tracker.gather(params, q)      # w_t and the codes of ŵ_t
    params = optax.apply_updates(params, updates)
    correct = jnp.sum(jnp.argmax(logits, -1) == y)
    new_state = {"params": params, "batch_stats": new_stats, "opt_state": opt_state}
    return new_state, loss, correct, tracked

  def _eval_step(self, qparams, batch_stats, x, y):
    return eval_sums(self.graphdef, self.config.loss, qparams, batch_stats, x, y)

  def evaluate(self, state, images, labels):
    """(mean loss, accuracy) of the quantized model on ``images``."""
    q = self.quantized(state["params"], state["opt_state"])
    return evaluate_batches(lambda x, y: self.eval_step(q, state["batch_stats"], x, y),
                            images, labels, self.config.eval_batch_size)


  def osc_stats(self, state):
    """Oscillation statistics of the last epoch, all quantized leaves together."""
    stats = jax.device_get(bq.oscillation_stats(state["opt_state"]))
    return {k.replace("all/", "osc_"): float(v) for k, v in stats.items()
            if k.startswith("all/")}


def eval_sums(graphdef, loss_name: str, params, batch_stats, x, y):
  """(summed loss, correct predictions) of the model at ``params`` on one batch."""
  model = nnx.merge(graphdef, params, batch_stats)
  logits = model(x, train=False)
  losses = per_example_loss(loss_name, logits, y)
  return jnp.sum(losses), jnp.sum(jnp.argmax(logits, -1) == y)


def evaluate_batches(step, images, labels, batch_size: int):
  """(mean loss, accuracy) summed by ``step(x, y)`` over the batches of ``images``."""
  loss = correct = 0.0
  for x, y in input_pipeline.eval_batches(images, labels, batch_size):
    l, c = step(x, y)
    loss, correct = loss + l, correct + c
  n = len(images)
  return float(loss) / n, float(correct) / n


def evaluate_packed(config: Config, path) -> dict:
  """Test loss and accuracy of the model in a packed file, as it is served.

  The model is rebuilt abstractly from ``config``; its packed parameters and
  batch-norm statistics are read from ``path`` (``bq.load_packed_model``, every
  leaf checked) and stay packed on the device; the jitted evaluation step
  unpacks them (``bq.dequantize_tree``) inside the forward pass. The accuracy
  equals the training run's final ``test_acc`` exactly.
  """
  config.validate()
  path = Path(path)
  raw = bq.load_packed(path)
  saved_hash = bytes(raw.get("__config_hash__", np.zeros(0, np.uint8))).decode()
  if saved_hash and saved_hash != config_hash(config):
    raise ValueError(f"--eval-packed {str(path)!r} was written by a run with config hash "
                     f"{saved_hash}, this config has {config_hash(config)}; pass the "
                     "--config and flags of the run that wrote it")
  data = load_data(config)
  test_x, test_y = data["test"]
  model = nnx.eval_shape(lambda: build_model(config, test_x.shape[1:]))
  graphdef, like, stats_like = nnx.split(model, nnx.Param, nnx.BatchStat)
  packed, batch_stats = bq.load_packed_model(path, like=like, extra_like=stats_like)
  step = jax.jit(lambda p, s, x, y: eval_sums(graphdef, config.loss, bq.dequantize_tree(p),
                                              s, x, y))
  loss, acc = evaluate_batches(lambda x, y: step(packed, batch_stats, x, y), test_x, test_y,
                               config.eval_batch_size)
  device_bytes = sum(x.nbytes for x in jax.tree.leaves((packed, batch_stats)))
  return {"test_loss": loss, "test_acc": acc, "device_bytes": device_bytes,
          "float_bytes": sum(math.prod(x.shape) * x.dtype.itemsize
                             for x in jax.tree.leaves((like, stats_like)))}


# ----------------------------------------------------------------------------
# Checkpoints (examples/checkpointing.py): what resume needs and nothing more.

# Config fields that may change when a run resumes (where the data is, what to
# write, how far to go this time); any other change refuses to resume.
FREE_ON_RESUME = ("stop_after_epoch", "data_dir", "download", "checkpoint", "export", "plot",
                  "progress", "max_consecutive_skips")


class _TrackerCheckpoint(NamedTuple):
  """The part of the oscillation tracker's state that an epoch's end does not
  fix: at an epoch's end the window has just rolled, so the window extremes
  are the params, its counters zero, and the last window's per-weight
  figures are overwritten before they are next read."""

  count: Any
  flips: Any
  codes: Any          # uint8 (a code index is < 2^8)
  last_cosine: Any
  prev_updates: Any
  cosine: Any
  cosine_all: Any


def checkpoint_state(state) -> dict:
  """What a checkpoint holds of the training state (taken at an epoch's end)."""
  inner, tracker = state["opt_state"]
  fields = {f: getattr(tracker, f) for f in _TrackerCheckpoint._fields}
  fields["codes"] = jax.tree.map(lambda c: c.astype(jnp.uint8), tracker.codes)
  return {"params": state["params"], "batch_stats": state["batch_stats"],
          "opt_state": inner, "tracker": _TrackerCheckpoint(**fields)}


def state_from_checkpoint(saved: dict, trainer: Trainer) -> dict:
  """The full training state of :func:`checkpoint_state`'s output."""
  params = saved["params"]
  tracker = trainer.tracker_tx.init(params)   # window extremes = params, counters 0
  kept = saved["tracker"]._replace(
      codes=jax.tree.map(lambda c: jnp.asarray(c, jnp.int32), saved["tracker"].codes))
  tracker = tracker._replace(**kept._asdict())
  return {"params": params, "batch_stats": saved["batch_stats"],
          "opt_state": (saved["opt_state"], tracker)}


def open_checkpoints(config: Config, workdir: Path, *, fresh: bool = False,
                     force: bool = False) -> checkpointing.Checkpoints:
  return checkpointing.Checkpoints(workdir / "checkpoints", dataclasses.asdict(config),
                                   free=FREE_ON_RESUME, defaults=dataclasses.asdict(Config()),
                                   max_to_keep=2, fresh=fresh, force=force)


# ----------------------------------------------------------------------------


def config_hash(config: Config) -> str:
  """The run's config hash (:func:`checkpointing.config_hash`, free fields left out)."""
  return checkpointing.config_hash(dataclasses.asdict(config), FREE_ON_RESUME)


class TrainingStopped(ValueError):
  """Too many steps in a row were skipped (the run diverged)."""


def train_and_evaluate(config: Config, workdir, *, fresh: bool = False,
                       force: bool = False) -> dict:
  """Trains ``config`` writing into ``workdir``; returns the final metrics row.

  A ``workdir`` holding a checkpoint of the same config resumes from it (bit
  for bit); one of another config is refused with a one-line
  :class:`checkpointing.ResumeError` naming the field, unless ``fresh``
  (delete it, start over) or ``force`` (resume with this config).
  """
  config.validate()
  config_cli.check_workdir(workdir)
  workdir = Path(workdir)
  if fresh:
    checkpointing.move_aside(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  ckpts = None
  if config.checkpoint or (workdir / "checkpoints").exists():
    ckpts = open_checkpoints(config, workdir, force=force)
    ckpts.check_config()   # a changed config stops here, before data and compiling
  data = load_data(config)
  train_x, train_y = data["train"]
  test_x, test_y = data["test"]
  steps_per_epoch = len(train_x) // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"config.batch_size {config.batch_size} > {len(train_x)} training examples")
  trainer = Trainer(config, train_x.shape[1:], steps_per_epoch)
  state = trainer.init_state
  metrics_path = workdir / "metrics.jsonl"
  losses_path = workdir / "step_losses.jsonl"
  # Compile before the clock starts: train_s counts training, not compilation.
  x0, y0 = next(iter(input_pipeline.train_batches(train_x, train_y, config.batch_size,
                                                  config.seed, 1, config.augment)))
  kinds = (False, True) if trainer.method.lookahead else (False,)
  compiled = {on: trainer.train_step.lower(state, x0, y0, 0, lookahead=on).compile()
              for on in kinds}
  trainer.train_step = lambda *args, lookahead: compiled[lookahead](*args)

  start_epoch, step, train_s, saved_rows = 0, 0, 0.0, None
  if ckpts is not None:
    restored = ckpts.restore(jax.eval_shape(lambda: checkpoint_state(state)))
    if restored is not None:
      _, saved, meta = restored
      state = state_from_checkpoint(saved, trainer)
      start_epoch, step, train_s = meta["epoch"], meta["step"], meta["train_s"]
      saved_rows = meta.get("metrics")
      print(f"resumed from epoch {start_epoch} (step {step})")
    if not config.checkpoint:
      ckpts.close()
  # The logs hold this run only: cut back to the epoch resumed from (or emptied).
  for path in (metrics_path, losses_path):
    checkpointing.truncate_jsonl(path, "epoch", start_epoch)
  checkpointing.write_atomic(workdir / "config.json",
                             json.dumps(dataclasses.asdict(config), indent=1))
  rows = [r for r in metrics_io.read_jsonl(metrics_path) if r["epoch"] <= start_epoch]
  if saved_rows is not None and rows != saved_rows:
    # The checkpoint holds every row up to its epoch: a damaged or cut log is rebuilt.
    print(f"{metrics_path}: {len(saved_rows) - len(rows)} missing or damaged row(s) "
          "restored from the checkpoint")
    checkpointing.write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in saved_rows))
    rows = saved_rows

  total_epochs = run_epochs(config)
  end_epoch = total_epochs
  if config.stop_after_epoch is not None:
    end_epoch = min(end_epoch, config.stop_after_epoch)
  if ckpts is not None and ckpts.differs and start_epoch >= end_epoch:
    raise checkpointing.ResumeError(
        f"{ckpts.differs}; that run is finished, so --force would train nothing and export "
        "or report a model made with the old config; use --fresh or another workdir")
  row = rows[-1] if rows else {}
  run_hash = config_hash(config)
  consecutive = 0   # skipped steps in a row, across epochs
  # Host buffer of the tracked weights: one (w, codes, off-grid) triple per epoch.
  window = collections.deque(maxlen=config.track_last_epochs)
  for epoch in range(start_epoch + 1, end_epoch + 1):
    batches = input_pipeline.train_batches(train_x, train_y, config.batch_size,
                                           config.seed, epoch, config.augment)
    if config.progress:
      from tqdm import tqdm
      batches = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch}", leave=False,
                     mininterval=2.0)
    t0 = time.perf_counter()
    losses, corrects, tracked, skip_totals = [], [], [], []
    skips_before = int(methods.skip_count(state["opt_state"]))
    for x, y in batches:
      state, loss, correct, tr = trainer.train_step(
          state, x, y, step, lookahead=trainer.method.lookahead_at(trainer.options, step))
      losses.append(loss)
      corrects.append(correct)
      skip_totals.append(methods.skip_count(state["opt_state"]))
      if tr is not None:
        tracked.append(tr)
      step += 1
    jax.block_until_ready(state)
    train_s += time.perf_counter() - t0
    step_losses = np.asarray(jax.device_get(jnp.stack(losses)), np.float64)
    skipped_flags = (np.diff(np.asarray(jax.device_get(jnp.stack(skip_totals))),
                             prepend=skips_before) > 0) | ~np.isfinite(step_losses)
    skipped, longest, consecutive = methods.skip_runs(skipped_flags, consecutive)
    if longest >= config.max_consecutive_skips:
      if config.checkpoint:
        ckpts.close()
      raise TrainingStopped(
          f"epoch {epoch}: {longest} consecutive steps were skipped (non-finite loss, "
          f"gradient or weights; config.max_consecutive_skips={config.max_consecutive_skips}); "
          "the last checkpoint is kept: lower --learning-rate or check the data")
    train_loss = float(step_losses.mean())
    train_acc = float(jnp.sum(jnp.stack(corrects))) / (steps_per_epoch * config.batch_size)
    diffs = np.diff(step_losses)
    test_loss, test_acc = trainer.evaluate(state, test_x, test_y)
    lr = trainer.schedule(step) if callable(trainer.schedule) else trainer.schedule
    row = {
        "epoch": epoch, "step": step,
        "grad_evals": grad_evals(config, step, steps_per_epoch),
        "train_s": round(train_s, 3), "train_loss": train_loss, "train_acc": train_acc,
        "loss_diff_std": float(diffs.std()) if len(diffs) else 0.0,
        "loss_diff_mean_abs": float(np.abs(diffs).mean()) if len(diffs) else 0.0,
        "test_loss": test_loss, "test_acc": test_acc, "lr": float(lr),
        "skipped_steps": skipped, "config_hash": run_hash,
        **trainer.osc_stats(state),
    }
    if "val" in data:
      row["val_loss"], row["val_acc"] = trainer.evaluate(state, *data["val"])
    if tracked:
      w, codes, off = (np.asarray(jax.device_get(jnp.stack(t))) for t in zip(*tracked))
      window.append((w, codes, off))
      row.update(WeightTracker.window_stats(*(np.concatenate(a) for a in zip(*window))))
    checkpointing.append_jsonl(metrics_path, row)
    rows.append(row)
    checkpointing.append_jsonl(losses_path, {
        "epoch": epoch, "losses": [round(float(l), 6) for l in step_losses]})
    val = f" val_acc {row['val_acc']:.4f}" if "val_acc" in row else ""
    print(f"epoch {epoch}: loss {train_loss:.4f} test_acc {test_acc:.4f}{val} "
          f"flip_freq {row['osc_flip_frequency']:.2e} skipped {skipped} ({train_s:.1f}s)",
          flush=True)
    if config.checkpoint:
      ckpts.save(epoch, checkpoint_state(state),
                 {"epoch": epoch, "step": step, "train_s": train_s, "metrics": rows})

  if config.checkpoint:
    ckpts.close()   # waits for the last save
  if window:
    w, codes, off = (np.concatenate(a) for a in zip(*window))
    checkpointing.savez_atomic(workdir / "tracked_weights.npz", w=w, codes=codes,
                               paths=np.asarray(trainer.tracker.paths()),
                               flat_index=trainer.tracker.flat_indices(),
                               last_epoch=row.get("epoch", 0))
  summary = {**metrics_io.best_validation(
      [r for r in metrics_io.read_jsonl(metrics_path) if r["epoch"] <= end_epoch]),
      "config_hash": config_hash(config)}
  checkpointing.write_atomic(workdir / "summary.json", json.dumps(summary, indent=1))
  if end_epoch == total_epochs:
    if config.export:
      export_model(trainer, state, workdir, run_hash)
    if config.plot:
      title = f"{config.dataset} {config.model} {config.method} {config.bits}-bit"
      metrics_io.plot_accuracy({None: [metrics_io.read_jsonl(metrics_path)]},
                               workdir / "accuracy.png", title=f"{title} (config {run_hash})")
  return {"state": state, "metrics": row, "trainer": trainer, "summary": summary}


def export_model(trainer: Trainer, state, workdir: Path, run_hash: str = "") -> None:
  """Writes ``model_packed.npz`` (bit-packed ``ŵ`` and the batch-norm
  statistics, with the run's config hash under ``"__config_hash__"``: all that
  :func:`evaluate_packed` needs) and ``size_report.txt``, each atomically."""
  params, forward = state["params"], trainer.method.forward
  spec = jax.tree.map(lambda _: None, params) if forward == "identity" else trainer.spec
  packed = bq.pack(params, spec, state=state["opt_state"] if forward == "loss_aware" else None)
  packed["__config_hash__"] = np.frombuffer(run_hash.encode(), np.uint8)
  path = workdir / "model_packed.npz"
  bq.save_packed(path, packed, extra=state["batch_stats"])
  lines = []
  bq.size_report(path, print_fn=lines.append)
  checkpointing.write_atomic(workdir / "size_report.txt",
                             "\n".join(lines + [f"config {run_hash}"]) + "\n")
  print("\n".join(l for l in lines if l.split()[0] in ("total", "on", "file")))
