"""ResNet18 on ImageNet with LAQ or BLAQ weights, data-parallel (pmap or jit).

The step is written once for a single device; ``bq.data_parallel`` turns it
into a ``pmap`` step (gradients and BatchNorm statistics averaged over the
``batch`` axis, BLAQ's lookahead gradient too) or a ``jit`` step over a
``Mesh`` (global batch sharded on ``data``, params and optimizer state
replicated). Checkpoints (orbax) hold one unreplicated copy of the state, so a
run can resume in either mode.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import blaq_jax as bq
from examples.imagenet_resnet18 import input_pipeline
from examples.imagenet_resnet18 import models

NUM_IMAGENET_TRAIN_IMAGES = 1_281_167


@dataclasses.dataclass
class Config:
  """Every setting of a run (``configs/*.py`` return one)."""

  # Data.
  data_dir: str = ""                   # ImageFolder root with train/ and val/
  synthetic: bool = False              # random batches of the real shape, no eval
  num_classes: int = 1000              # synthetic mode only (else: from train/)
  image_size: int = 224                # training and evaluation crop
  resize_size: int = 256               # evaluation: short side before the crop
  num_data_threads: int = 16
  # Model.
  model: str = "ResNet18"
  num_filters: int = 64
  half_precision: bool = True          # bfloat16 compute on GPU/TPU (float32 on CPU)
  # Quantization and optimizer.
  optimizer: str = "blaq"              # "blaq" or "laq"
  bits: int = 1
  scheme: str = "linear"
  first_last_bits: Optional[int] = 8   # conv_init and head kernels; None: full precision
  a: float = 0.9                       # BLAQ: weight of the current gradient (Eq. 9-10)
  m: Optional[int] = 10                # BLAQ: two-stage update in 1 epoch of every m; None: always
  learning_rate: float = 1e-3          # peak of the cosine schedule (Adam-scale)
  warmup_epochs: float = 5.0
  num_epochs: float = 100.0
  batch_size: int = 256                # global, over all devices and processes
  # Parallelism.
  parallel: str = "jit"                # "jit" (over a Mesh) or "pmap"
  # Loop.
  num_train_steps: int = -1            # -1: num_epochs worth of steps
  eval_every_steps: int = -1           # -1: once per epoch (and at the end)
  steps_per_eval: int = -1             # -1: the whole validation set
  log_every_steps: int = 100
  checkpoint_every_steps: int = 1000
  max_checkpoints_to_keep: int = 2
  seed: int = 0


def compute_dtype(config: Config):
  if config.half_precision and jax.default_backend() in ("gpu", "tpu"):
    return jnp.bfloat16
  return jnp.float32


def create_optimizer(config: Config, params, num_steps: int, steps_per_epoch: int,
                     batch_axis_name: Optional[str] = None):
  """Returns ``(spec, tx, schedule)``: the quantization spec, LAQ or BLAQ, and the
  warm-up + cosine learning rate (``batch_axis_name``: BLAQ's pmap axis)."""
  overrides = {}
  if config.first_last_bits != config.bits:
    overrides = {r"^conv_init/kernel": config.first_last_bits,
                 r"^head/kernel": config.first_last_bits}
  spec = bq.quant_spec(params, bits=config.bits, scheme=config.scheme, overrides=overrides)
  warmup = min(int(config.warmup_epochs * steps_per_epoch), max(num_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1), end_value=0.0)
  if config.optimizer == "blaq":
    lookahead = None if config.m is None else bq.periodic_lookahead(config.m, steps_per_epoch)
    tx = bq.blaq(schedule, spec, a=config.a, lookahead_schedule=lookahead,
                 batch_axis_name=batch_axis_name)
  elif config.optimizer == "laq":
    tx = bq.laq(schedule, spec)
  else:
    raise ValueError(f"optimizer must be 'blaq' or 'laq', got {config.optimizer!r}")
  return spec, tx, schedule


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def make_steps(graphdef, spec, tx, dp: bq.DataParallel, dtype):
  """The single-device train and eval steps (``dp.pmean``/``dp.psum`` reduce under pmap)."""

  def loss_fn(params, batch_stats, images, labels):
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    logits = model(input_pipeline.normalize(images, dtype))
    loss = jnp.mean(cross_entropy(logits, labels))
    return loss, (logits, nnx.state(model, nnx.BatchStat))

  def train_step(params, batch_stats, opt_state, images, labels):
    q = bq.quantize_params(params, spec, state=opt_state)   # ŵ_t
    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        q, batch_stats, images, labels)
    grads = dp.pmean(grads)
    # BLAQ's lookahead gradient g*; blaq pmeans it itself (batch_axis_name).
    grad_fn = jax.grad(lambda p: loss_fn(p, batch_stats, images, labels)[0])
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
    return params, new_stats, opt_state, dp.pmean(metrics)

  def eval_step(params, batch_stats, opt_state, images, labels):
    q = bq.quantize_params(params, spec, state=opt_state)
    model = nnx.merge(graphdef, q, batch_stats)
    model.eval()
    logits = model(input_pipeline.normalize(images, dtype))
    mask = labels >= 0
    safe = jnp.where(mask, labels, 0)
    sums = {"loss": jnp.sum(jnp.where(mask, cross_entropy(logits, safe), 0.0)),
            "correct": jnp.sum(mask & (jnp.argmax(logits, -1) == labels)),
            "count": jnp.sum(mask)}
    return dp.psum(jax.tree.map(lambda x: x.astype(jnp.float32), sums))

  return train_step, eval_step


def _host(dp: bq.DataParallel, tree):
  """One unreplicated copy as numpy (checkpoints, logs)."""
  return jax.device_get(dp.unreplicate(tree))


def train_and_evaluate(config: Config, workdir: str) -> dict[str, Any]:
  """Trains (resuming from ``workdir`` if it holds a checkpoint) and evaluates.

  Returns a summary: ``start_step``, ``step``, the last logged train metrics,
  ``images_per_sec`` (global, compilation excluded) and the last eval metrics.
  """
  dp = bq.data_parallel(config.parallel)
  if config.batch_size % jax.device_count():
    raise ValueError(f"batch_size {config.batch_size} must be divisible by the "
                     f"{jax.device_count()} devices")
  local_batch = config.batch_size // jax.process_count()
  dtype = compute_dtype(config)
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0

  if config.synthetic:
    classes, num_classes, num_train = None, config.num_classes, NUM_IMAGENET_TRAIN_IMAGES
  else:
    classes = input_pipeline.find_classes(config.data_dir)
    num_classes = len(classes)
    num_train = len(input_pipeline.list_images(config.data_dir, "train", classes))
  steps_per_epoch = max(num_train // config.batch_size, 1)
  num_steps = (config.num_train_steps if config.num_train_steps > 0
               else int(config.num_epochs * steps_per_epoch))
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch

  model = models.create_model(config.model, num_classes=num_classes,
                              num_filters=config.num_filters, dtype=dtype,
                              axis_name=dp.axis_name, rngs=nnx.Rngs(config.seed))
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  spec, tx, schedule = create_optimizer(config, params, num_steps, steps_per_epoch,
                                        dp.axis_name)
  state = {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params)}

  manager = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=config.max_checkpoints_to_keep,
          save_interval_steps=config.checkpoint_every_steps))
  start_step = manager.latest_step() or 0
  if start_step:
    state = manager.restore(start_step, args=ocp.args.StandardRestore(jax.device_get(state)))
    logging.info("resumed from %s at step %d", manager.directory, start_step)
  params, batch_stats, opt_state = dp.replicate(
      (state["params"], state["batch_stats"], state["opt_state"]))

  train_step, eval_step = make_steps(graphdef, spec, tx, dp, dtype)
  donate = (0, 1, 2) if jax.default_backend() != "cpu" else ()
  p_train_step = dp.parallelize(train_step, batch_argnums=(3, 4), donate_argnums=donate)
  p_eval_step = dp.parallelize(eval_step, batch_argnums=(3, 4))

  if config.synthetic:
    fixed = dp.shard_batch(input_pipeline.synthetic_batch(
        local_batch, config.image_size, num_classes, seed=config.seed + jax.process_index()))
    batches = iter(lambda: fixed, None)
  else:
    batches = (dp.shard_batch(b) for b in input_pipeline.train_dataset(
        config.data_dir, classes, local_batch, image_size=config.image_size,
        seed=config.seed, start_step=start_step, num_threads=config.num_data_threads))

  def evaluate(step):
    n = (config.steps_per_eval if config.steps_per_eval > 0 else
         input_pipeline.eval_steps(config.data_dir, classes, config.batch_size))
    sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    for batch in input_pipeline.eval_dataset(
        config.data_dir, classes, local_batch, n, image_size=config.image_size,
        resize_size=config.resize_size, num_threads=config.num_data_threads):
      batch = dp.shard_batch(batch)
      out = _host(dp, p_eval_step(params, batch_stats, opt_state, batch["image"],
                                  batch["label"]))
      sums = {k: sums[k] + float(out[k]) for k in sums}
    result = {"step": step, "eval_loss": sums["loss"] / max(sums["count"], 1),
              "eval_accuracy": sums["correct"] / max(sums["count"], 1),
              "eval_images": int(round(sums["count"]))}
    logging.info("eval %s", result)
    return result

  log_path = os.path.join(workdir, "metrics.jsonl")
  os.makedirs(workdir, exist_ok=True)

  def write(record):
    if is_main:
      with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")

  summary = {"start_step": start_step, "step": start_step, "num_steps": num_steps}
  timer_step, timer_start, window = None, None, []
  for step in range(start_step, num_steps):
    batch = next(batches)
    params, batch_stats, opt_state, metrics = p_train_step(
        params, batch_stats, opt_state, batch["image"], batch["label"])
    window.append(metrics)
    done = step + 1
    if timer_start is None:  # the first step compiles: time from its end
      jax.block_until_ready(metrics)
      timer_step, timer_start = done, time.perf_counter()
    if done % config.log_every_steps == 0 or done == num_steps:
      record = {"step": done}
      if window:
        host = _host(dp, window)
        record.update({k: float(np.mean([m[k] for m in host])) for k in host[0]})
      if done > timer_step:
        record["images_per_sec"] = ((done - timer_step) * config.batch_size
                                    / (time.perf_counter() - timer_start))
      record["learning_rate"] = float(schedule(_host(dp, opt_state).count))
      logging.info("train %s", record)
      write(record)
      summary.update(record)
      window = []
    if not config.synthetic and (done % eval_every == 0 or done == num_steps):
      summary.update(evaluate(done))
      write({k: v for k, v in summary.items() if k.startswith("eval") or k == "step"})
    if done % config.checkpoint_every_steps == 0 or done == num_steps:
      manager.save(done, args=ocp.args.StandardSave(_host(
          dp, {"params": params, "batch_stats": batch_stats, "opt_state": opt_state})),
          force=done == num_steps)
    summary["step"] = done
  manager.wait_until_finished()
  manager.close()
  summary["state"] = _host(dp, {"params": params, "batch_stats": batch_stats,
                               "opt_state": opt_state})
  return summary
