"""Training and evaluation of a low-bit classifier with a method of ``examples/methods.py``.

``train_and_evaluate(config, workdir)`` is the whole program; ``main.py`` only
parses flags. It resolves ``config.method`` once (``configs/base.py``), builds
the model, the quantization spec and the optimizer, and runs the module-level
``train_step`` and ``eval_step``, jitted. Per epoch it writes one line of
``workdir/metrics.jsonl`` (test accuracy with the quantized weights ``ŵ``,
validation accuracy when ``config.val_split`` holds out the end of the training
set, train loss and its step-to-step fluctuation, gradient evaluations,
training seconds excluding compilation and evaluation, oscillation statistics,
per-weight figures of ``weight_tracker.py``), every step's loss in
``step_losses.jsonl``, and an orbax checkpoint in ``workdir/checkpoints``
(``examples/checkpointing.py``: running the same config again continues from
the latest one bit for bit, the data order being a function of ``(seed,
epoch)`` and nothing else random; another config is refused unless ``fresh``
or ``force``). At the end: ``summary.json`` (test accuracy at the
best-validation epoch and at the last), the bit-packed model with its
batch-norm statistics (``model_packed.npz``, which :func:`evaluate_packed`
serves: ``main.py --eval-packed``), its size report and ``accuracy.png``.

``blaq-m`` runs BLAQ's two-stage update during one epoch in every
``config.m`` (``bq.periodic_lookahead``; the host picks one of two compiled
steps), ``laq-as-blaq`` / ``laq-as-blaq-m`` train LAQ for as many gradient
evaluations as ``blaq`` / ``blaq-m`` spend (the epochs and the learning-rate
schedule stretched by the method's ``run_scale``).

Oscillation statistics (the analogue of the paper's Table 1 over the whole
network) come from :func:`blaq_jax.track_oscillations` chained after the
optimizer with a window of one epoch: ``osc_flip_frequency`` (code flips per
quantized weight per step), ``osc_amplitude_mean`` / ``osc_amplitude_max``
(peak-to-peak range of the latent weights), ``osc_max_weight_flips`` and
``osc_cosine``. Losses: ``"cross_entropy"`` or ``"squared_hinge"`` (the
"L2-SVM" output of BinaryConnect / LAB / BLAQ on ±1 targets).
"""

from __future__ import annotations

import dataclasses
import functools
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
from examples.classification import resume
from examples.classification.configs import base
from examples.classification.configs.base import Config
from examples.classification.weight_tracker import WeightTracker


def build_model(config: Config, image_shape):
  kwargs = dict(config.model_kwargs)
  h, w, c = image_shape
  if config.model == "mlp":
    kwargs.setdefault("in_features", h * w * c)
  else:
    kwargs.setdefault("in_channels", c)
    kwargs.setdefault("image_size", h)
  return models.create_model(config.model, seed=config.seed, **kwargs)


def make_schedule(config: Config, run: base.Resolved):
  """The learning rate per step; epochs (milestones, periods, the cosine's
  horizon) stretch with the method's ``run_scale``."""
  lr, spe = config.learning_rate, run.options.steps_per_epoch
  scale = run.method.run_scale(run.options)
  epoch_steps = lambda epochs: max(1, int(round(epochs * scale * spe)))
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
  return optax.cosine_decay_schedule(lr, run.epochs * spe)


def make_optimizer(run: base.Resolved, spec, schedule):
  """The method's optimizer, chained with the oscillation tracker (window: one
  epoch); the state is ``(method's state, tracker's state)``."""
  return optax.chain(run.method.optimizer(schedule, spec, run.options),
                     bq.track_oscillations(spec, window=run.options.steps_per_epoch))


class Context(NamedTuple):
  """What the steps need besides the arrays (closed over, not traced)."""

  graphdef: Any
  spec: Any
  tx: optax.GradientTransformation
  method: methods.Method
  options: methods.Options
  loss: str
  tracker: WeightTracker


def per_example_loss(name: str, logits, labels):
  """Per-example loss: cross-entropy, or squared hinge averaged over classes."""
  if name == "squared_hinge":
    t = 2.0 * jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype) - 1.0
    return jnp.mean(jnp.square(jax.nn.relu(1.0 - t * logits)), axis=-1)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(ctx: Context, state: dict, x, y, step, lookahead: bool):
  """One step of the method: ``(state, loss, correct, tracked)``; ``tracked``
  is ``(w_t, codes of ŵ_t)`` of the sampled weights (None without tracking)."""
  params, batch_stats, opt_state = state["params"], state["batch_stats"], state["opt_state"]

  def loss_fn(p):
    model = nnx.merge(ctx.graphdef, p, batch_stats, copy=True)
    logits = model(x, train=True)
    loss = jnp.mean(per_example_loss(ctx.loss, logits, y))
    return loss, (nnx.state(model, nnx.BatchStat), logits)

  updates, opt_state, loss, (new_stats, logits) = ctx.method.step(
      ctx.tx, ctx.spec, params, opt_state, loss_fn, count=step, options=ctx.options,
      lookahead=lookahead)
  tracked = None
  if ctx.tracker.size:   # the codes of ŵ_t (for fp: of the plain projection of w_t)
    packed = (ctx.method.pack(params, ctx.spec, state["opt_state"]) if ctx.method.quantized
              else bq.pack_params(params, ctx.spec))
    tracked = ctx.tracker.gather(params, packed)
  params = optax.apply_updates(params, updates)
  correct = jnp.sum(jnp.argmax(logits, -1) == y)
  return ({"params": params, "batch_stats": new_stats, "opt_state": opt_state}, loss, correct,
          tracked)


def eval_step(graphdef, loss: str, weights, batch_stats, x, y):
  """(summed loss, correct predictions) of the model at ``weights`` on one batch."""
  logits = nnx.merge(graphdef, weights, batch_stats)(x, train=False)
  return jnp.sum(per_example_loss(loss, logits, y)), jnp.sum(jnp.argmax(logits, -1) == y)


def evaluate(step, images, labels, batch_size: int):
  """(mean loss, accuracy) summed by ``step(x, y)`` over the batches of ``images``."""
  loss = correct = 0.0
  for x, y in input_pipeline.eval_batches(images, labels, batch_size):
    l, c = step(x, y)
    loss, correct = loss + l, correct + c
  return float(loss) / len(images), float(correct) / len(images)


def config_hash(config: Config) -> str:
  """The run's config hash (:func:`checkpointing.config_hash`, free fields left out)."""
  return checkpointing.config_hash(dataclasses.asdict(config), base.FREE_ON_RESUME)


class TrainingStopped(ValueError):
  """Too many steps in a row were skipped (the run diverged)."""


def train_and_evaluate(config: Config, workdir, *, fresh: bool = False,
                       force: bool = False) -> dict:
  """Trains ``config`` writing into ``workdir``; returns the final ``state``,
  ``metrics`` row and ``summary``, and the steps' ``context``.

  A ``workdir`` holding a checkpoint of the same config resumes from it (bit
  for bit); one of another config is refused with a one-line
  :class:`checkpointing.ResumeError` naming the field, unless ``fresh``
  (move it aside, start over) or ``force`` (resume with this config).
  """
  config.validate()
  config_cli.check_workdir(workdir)
  workdir = Path(workdir)
  if fresh:
    checkpointing.move_aside(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  ckpts = resume.open_checkpoints(config, workdir, force=force)   # before data and compiling
  data = input_pipeline.load_splits(config)
  train_x, train_y = data["train"]
  steps_per_epoch = len(train_x) // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"config.batch_size {config.batch_size} > {len(train_x)} training examples")
  run = base.resolve(config, steps_per_epoch)
  method, options = run.method, run.options

  graphdef, params, batch_stats = nnx.split(build_model(config, train_x.shape[1:]), nnx.Param,
                                            nnx.BatchStat)
  spec = bq.quant_spec(params, bits=config.bits, scheme=config.scheme,
                       per_channel=config.per_channel)
  schedule = make_schedule(config, run)
  tx = make_optimizer(run, spec, schedule)
  tracker = WeightTracker(params, spec, config.track_weights, config.seed,
                          config.track_last_epochs)
  ctx = Context(graphdef, spec, tx, method, options, config.loss, tracker)
  state = {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params)}
  # Compile before the clock starts: train_s counts training, not compilation.
  # One step per value of `lookahead` (blaq-m's off steps are LAQ's).
  x0, y0 = next(iter(input_pipeline.train_batches(train_x, train_y, config.batch_size,
                                                  config.seed, 1, config.augment)))
  steps = {on: jax.jit(functools.partial(train_step, ctx, lookahead=on)).lower(
      state, x0, y0, 0).compile() for on in ((False, True) if method.lookahead else (False,))}
  eval_fn = jax.jit(functools.partial(eval_step, graphdef, config.loss))

  def evaluate_split(state, split):
    # ŵ eagerly (once per epoch): exactly the values the packed export holds.
    weights = method.weights(state["params"], spec, state["opt_state"])
    return evaluate(lambda x, y: eval_fn(weights, state["batch_stats"], x, y), *data[split],
                    config.eval_batch_size)

  state, start_epoch, step, train_s, rows = resume.resume(ckpts, state, tx, workdir)
  if ckpts is not None and not config.checkpoint:
    ckpts.close()
  checkpointing.write_atomic(workdir / "config.json",
                             json.dumps(dataclasses.asdict(config), indent=1))
  metrics_path, losses_path = workdir / "metrics.jsonl", workdir / "step_losses.jsonl"

  end_epoch = min(run.epochs, config.stop_after_epoch or run.epochs)
  if ckpts is not None and ckpts.differs and start_epoch >= end_epoch:
    raise checkpointing.ResumeError(
        f"{ckpts.differs}; that run is finished, so --force would train nothing and export "
        "or report a model made with the old config; use --fresh or another workdir")
  row, run_hash = (rows[-1] if rows else {}), config_hash(config)
  consecutive = 0   # skipped steps in a row, across epochs
  for epoch in range(start_epoch + 1, end_epoch + 1):
    batches = input_pipeline.train_batches(train_x, train_y, config.batch_size, config.seed,
                                           epoch, config.augment)
    if config.progress:
      from tqdm import tqdm
      batches = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch}", leave=False,
                     mininterval=2.0)
    t0 = time.perf_counter()
    losses, corrects, tracked, skip_totals = [], [], [], []
    skips_before = int(methods.skip_count(state["opt_state"]))
    for x, y in batches:
      state, loss, correct, tr = steps[method.lookahead_at(options, step)](state, x, y, step)
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
    diffs = np.diff(step_losses)
    test_loss, test_acc = evaluate_split(state, "test")
    osc = jax.device_get(bq.oscillation_stats(state["opt_state"]))
    row = {
        "epoch": epoch, "step": step, "grad_evals": method.grad_evals(options, step),
        "train_s": round(train_s, 3), "train_loss": float(step_losses.mean()),
        "train_acc": float(jnp.sum(jnp.stack(corrects))) / (steps_per_epoch * config.batch_size),
        "loss_diff_std": float(diffs.std()) if len(diffs) else 0.0,
        "loss_diff_mean_abs": float(np.abs(diffs).mean()) if len(diffs) else 0.0,
        "test_loss": test_loss, "test_acc": test_acc,
        "lr": float(schedule(step) if callable(schedule) else schedule),
        "skipped_steps": skipped, "config_hash": run_hash,
        **{k.replace("all/", "osc_"): float(v) for k, v in osc.items() if k.startswith("all/")},
    }
    if "val" in data:
      row["val_loss"], row["val_acc"] = evaluate_split(state, "val")
    if tracked:
      row.update(tracker.add_epoch(tracked))
    checkpointing.append_jsonl(metrics_path, row)
    rows.append(row)
    checkpointing.append_jsonl(losses_path, {
        "epoch": epoch, "losses": [round(float(l), 6) for l in step_losses]})
    val = f" val_acc {row['val_acc']:.4f}" if "val_acc" in row else ""
    print(f"epoch {epoch}: loss {row['train_loss']:.4f} test_acc {test_acc:.4f}{val} "
          f"flip_freq {row['osc_flip_frequency']:.2e} skipped {skipped} ({train_s:.1f}s)",
          flush=True)
    if config.checkpoint:
      ckpts.save(epoch, resume.checkpoint_state(state),
                 {"epoch": epoch, "step": step, "train_s": train_s, "metrics": rows})

  if config.checkpoint:
    ckpts.close()   # waits for the last save
  if tracker.window:
    tracker.save(workdir / "tracked_weights.npz", last_epoch=row.get("epoch", 0))
  summary = {**metrics_io.best_validation(
      [r for r in metrics_io.read_jsonl(metrics_path) if r["epoch"] <= end_epoch]),
      "config_hash": run_hash}
  checkpointing.write_atomic(workdir / "summary.json", json.dumps(summary, indent=1))
  if end_epoch == run.epochs:
    if config.export:
      export_model(method.export(state["params"], spec, state["opt_state"]),
                   state["batch_stats"], workdir, run_hash)
    if config.plot:
      title = f"{config.dataset} {config.model} {config.method} {config.bits}-bit"
      metrics_io.plot_accuracy({None: [metrics_io.read_jsonl(metrics_path)]},
                               workdir / "accuracy.png", title=f"{title} (config {run_hash})")
  return {"state": state, "metrics": row, "context": ctx, "summary": summary}


def export_model(packed: dict, batch_stats, workdir: Path, run_hash: str) -> None:
  """Writes ``model_packed.npz`` (``packed``: the method's ``export``, with the
  batch-norm statistics and the run's config hash under ``"__config_hash__"``:
  all that :func:`evaluate_packed` needs) and ``size_report.txt``, atomically."""
  packed["__config_hash__"] = np.frombuffer(run_hash.encode(), np.uint8)
  path = workdir / "model_packed.npz"
  bq.save_packed(path, packed, extra=batch_stats)
  lines = []
  bq.size_report(path, print_fn=lines.append)
  checkpointing.write_atomic(workdir / "size_report.txt",
                             "\n".join(lines + [f"config {run_hash}"]) + "\n")
  print("\n".join(l for l in lines if l.split()[0] in ("total", "on", "file")))


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
  test_x, test_y = input_pipeline.load_splits(config)["test"]
  model = nnx.eval_shape(lambda: build_model(config, test_x.shape[1:]))
  graphdef, like, stats_like = nnx.split(model, nnx.Param, nnx.BatchStat)
  packed, batch_stats = bq.load_packed_model(path, like=like, extra_like=stats_like)
  step = jax.jit(lambda p, s, x, y: eval_step(graphdef, config.loss, bq.dequantize_tree(p),
                                              s, x, y))
  loss, acc = evaluate(lambda x, y: step(packed, batch_stats, x, y), test_x, test_y,
                       config.eval_batch_size)
  device_bytes = sum(x.nbytes for x in jax.tree.leaves((packed, batch_stats)))
  return {"test_loss": loss, "test_acc": acc, "device_bytes": device_bytes,
          "float_bytes": sum(math.prod(x.shape) * x.dtype.itemsize
                             for x in jax.tree.leaves((like, stats_like)))}
