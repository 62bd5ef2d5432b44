"""ResNet18 on ImageNet with LAQ or BLAQ weights, data-parallel (pmap or jit).

The step is written once for a single device; ``bq.data_parallel`` turns it
into a ``pmap`` step (gradients and BatchNorm statistics averaged over the
``batch`` axis, BLAQ's lookahead gradient too) or a ``jit`` step over a
``Mesh`` (global batch sharded on ``data``, params and optimizer state
replicated). Checkpoints (orbax) hold one unreplicated copy of the state, so a
run can resume in either mode.

Methods (``config.method``, names of ``examples/methods.py``): ``laq``;
``blaq`` (the two-stage update on every step); ``blaq-m``, BLAQ as the paper
runs it on ImageNet: the two-stage update during one epoch in every
``config.m`` (10) epochs, LAQ in the others (``bq.periodic_lookahead``);
``fp``, Adam in full precision (to train the starting point of the ALQ
protocol, which the paper follows: quantized training starts from a
pretrained full-precision ResNet18).

``config.init_from`` loads such a full-precision starting point: the ``params``
and ``batch_stats`` of an ``.npz`` file keyed by parameter path
(``conv_init/kernel``, ``blocks/0/bn1/scale``, ...; :func:`save_params_npz`
writes one) or of an orbax checkpoint of this example (a step directory of
``<workdir>/checkpoints``, e.g. of an ``fp`` run). The optimizer state starts
fresh. Ignored when the run resumes from its own checkpoint.

At the end, ``<workdir>/model_packed.npz`` holds the bit-packed ``ŵ`` and the
batch-norm statistics (``bq.save_packed(..., extra=batch_stats)``):
everything :func:`evaluate_packed` (``main.py --eval-packed``) needs to serve
the model. Evaluation during training runs from the same packed value
(``bq.dequantize_tree(bq.pack_params(...))`` inside the step), so the served
model's accuracy equals the run's final ``eval_accuracy`` exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import blaq_jax as bq
from examples import checkpointing
from examples import config_cli
from examples import methods
from examples.imagenet_resnet18 import input_pipeline
from examples.imagenet_resnet18 import models

NUM_IMAGENET_TRAIN_IMAGES = 1_281_167
METHODS = ("fp", "laq", "blaq", "blaq-m")   # the names of examples/methods.py it runs

# Config fields that may change when a run resumes (where the data is, how it is
# read and logged, the parallel mode, how far to run); any other change refuses.
FREE_ON_RESUME = ("data_dir", "num_data_threads", "parallel", "num_train_steps",
                  "eval_every_steps", "steps_per_eval", "log_every_steps",
                  "checkpoint_every_steps", "max_checkpoints_to_keep", "init_from",
                  "max_consecutive_skips")


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
  # Quantization and method.
  method: str = "blaq-m"               # "laq", "blaq", "blaq-m" or "fp" (full precision)
  bits: int = 1
  scheme: str = "linear"
  first_last_bits: int | None = 8   # conv_init and head kernels; None: full precision
  a: float = 0.9
  m: int = 10                          # blaq-m: the two-stage update in one epoch of every m
  init_from: str = ""                  # full-precision params (.npz or orbax step directory)
  learning_rate: float = 1e-3          # peak of the cosine schedule (Adam-scale)
  lr_schedule: str = "warmup_cosine"   # or "exponential": ×lr_decay per epoch, no warm-up
  lr_decay: float = 0.95
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
  max_consecutive_skips: int = 200   # stop when this many steps in a row were skipped

  def validate(self):
    """Raises a one-line ``ValueError`` naming the first bad field."""
    for name, options in (("method", METHODS), ("parallel", ("jit", "pmap")),
                          ("lr_schedule", ("warmup_cosine", "exponential"))):
      if getattr(self, name) not in options:
        raise ValueError(f"config.{name} must be one of {options}, got {getattr(self, name)!r}")
    for name in ("batch_size", "image_size", "resize_size", "num_data_threads", "m",
                 "log_every_steps", "checkpoint_every_steps", "max_checkpoints_to_keep"):
      if getattr(self, name) < 1:
        raise ValueError(f"config.{name} must be >= 1, got {getattr(self, name)}")
    if not self.num_epochs > 0:
      raise ValueError(f"config.num_epochs must be > 0, got {self.num_epochs}")
    if not 0 <= self.a <= 1:
      raise ValueError(f"config.a must be in [0, 1], got {self.a}")
    check = config_cli.check_number
    check(self, "learning_rate", lo=0)
    check(self, "a", lo=0, hi=1)
    check(self, "bits", lo=1, hi=8, integer=True)
    check(self, "first_last_bits", lo=1, hi=8, integer=True, none_ok=True)
    check(self, "seed", lo=0, integer=True)
    check(self, "num_classes", lo=2, integer=True)
    check(self, "lr_decay", lo=0, lo_open=True)
    check(self, "warmup_epochs", lo=0)
    check(self, "num_filters", lo=1, integer=True)
    check(self, "max_consecutive_skips", lo=1, integer=True)
    for name in ("num_train_steps", "eval_every_steps", "steps_per_eval"):
      value = getattr(self, name)
      if value != -1:
        check(self, name, lo=1, integer=True)
    config_cli.check_choice(self, "scheme", ("linear", "log", "ternary"))
    config_cli.check_choice(self, "model", tuple(sorted(models.MODELS)))
    if self.init_from and not os.path.exists(self.init_from):
      raise ValueError(f"config.init_from {self.init_from!r} does not exist; pass an .npz "
                       "or an orbax step directory with --init-from")
    if not self.synthetic and not self.data_dir:
      raise ValueError("config.data_dir is empty; pass --data-dir DIR (an ImageFolder "
                       "root with train/ and val/) or --synthetic")
    return self


def compute_dtype(config: Config):
  if config.half_precision and jax.default_backend() in ("gpu", "tpu"):
    return jnp.bfloat16
  return jnp.float32




def create_optimizer(config: Config, params, num_steps: int, steps_per_epoch: int,
                     batch_axis_name: str | None = None):
  """Returns ``(spec, tx, schedule)``: the quantization spec, the optimizer and the
  learning rate (``batch_axis_name``: BLAQ's pmap axis)."""
  overrides = {}
  if config.first_last_bits != config.bits:
    overrides = {r"^conv_init/kernel": config.first_last_bits,
                 r"^head/kernel": config.first_last_bits}
  spec = bq.quant_spec(params, bits=config.bits, scheme=config.scheme, overrides=overrides)
  if config.lr_schedule == "exponential":
    schedule = optax.exponential_decay(config.learning_rate, max(steps_per_epoch, 1),
                                       config.lr_decay, staircase=True)
  elif config.lr_schedule == "warmup_cosine":
    warmup = min(int(config.warmup_epochs * steps_per_epoch), max(num_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1), end_value=0.0)
  else:
    raise ValueError(f"lr_schedule must be 'warmup_cosine' or 'exponential', "
                     f"got {config.lr_schedule!r}")
  options = method_options(config, steps_per_epoch, batch_axis_name)
  tx = methods.get(config.method).optimizer(schedule, spec, options)
  return spec, tx, schedule


def method_options(config: Config, steps_per_epoch: int,
                   batch_axis_name: str | None = None) -> methods.Options:
  return methods.Options(a=config.a, m=config.m, steps_per_epoch=steps_per_epoch,
                         batch_axis_name=batch_axis_name)


def _path_dict(tree) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  out = {}
  for path, x in flat:
    key = jax.tree_util.keystr(path, simple=True, separator="/")
    out[key.removesuffix("/value")] = x
  return out


def save_params_npz(path: str, params, batch_stats) -> None:
  """Writes ``params`` and ``batch_stats`` as an ``.npz`` keyed ``params/<path>`` and
  ``batch_stats/<path>`` (the format ``config.init_from`` reads)."""
  arrays = {f"params/{k}": np.asarray(v) for k, v in _path_dict(params).items()}
  arrays.update({f"batch_stats/{k}": np.asarray(v) for k, v in _path_dict(batch_stats).items()})
  checkpointing.savez_atomic(path, **arrays)


def load_init(path: str, params, batch_stats):
  """``(params, batch_stats)`` of ``path`` (``.npz`` or an orbax step directory),
  checked leaf by leaf against the model's."""
  if path.endswith(".npz"):
    with np.load(path) as f:
      stored = {k: f[k] for k in f.files}
  else:
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "state")):   # a step of examples/checkpointing.py
      path = os.path.join(path, "state")
    raw = ocp.StandardCheckpointer().restore(path)
    stored = {f"{part}/{k}": np.asarray(v) for part in ("params", "batch_stats")
              for k, v in _path_dict(raw[part]).items()}
  out = []
  for part, tree in (("params", params), ("batch_stats", batch_stats)):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = []
    for p, x in flat:
      key = f"{part}/" + jax.tree_util.keystr(p, simple=True, separator="/").removesuffix("/value")
      if key not in stored:
        raise ValueError(f"init_from {path}: no array {key!r} (has e.g. {sorted(stored)[:4]})")
      if np.shape(stored[key]) != np.shape(x):
        raise ValueError(f"init_from {path}: {key} has shape {np.shape(stored[key])}, "
                         f"the model's is {np.shape(x)}")
      leaves.append(jnp.asarray(stored[key], dtype=x.dtype))
    out.append(jax.tree.unflatten(treedef, leaves))
  return tuple(out)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def make_steps(graphdef, spec, tx, dp: bq.DataParallel, dtype, method: str = "blaq"):
  """The single-device train and eval steps of ``method`` (a name of
  ``examples/methods.py``; ``dp.pmean``/``dp.psum`` reduce under pmap)."""
  method = methods.get(method)

  def loss_fn(params, batch_stats, images, labels):
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    logits = model(input_pipeline.normalize(images, dtype))
    loss = jnp.mean(cross_entropy(logits, labels))
    return loss, (logits, nnx.state(model, nnx.BatchStat))

  def train_step(params, batch_stats, opt_state, images, labels, lookahead=True):
    # The gradient at ŵ_t, pmean-ed; BLAQ's lookahead gradient g* is pmean-ed
    # by blaq itself (batch_axis_name). `lookahead` is a Python bool.
    updates, opt_state, loss, (logits, new_stats) = method.step(
        tx, spec, params, opt_state, lambda p: loss_fn(p, batch_stats, images, labels),
        reduce=dp.pmean, lookahead=lookahead)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
               "skipped_total": methods.skip_count(opt_state).astype(jnp.float32)}
    return params, new_stats, opt_state, dp.pmean(metrics)

  def eval_step(params, batch_stats, opt_state, images, labels):
    # ŵ as the packed model holds it (bit for bit), so that the model served
    # from model_packed.npz (evaluate_packed) scores exactly this.
    packed = method.pack(params, spec, opt_state)
    return eval_sums(graphdef, dp, dtype, packed, batch_stats, images, labels)

  return train_step, eval_step


def eval_sums(graphdef, dp: bq.DataParallel, dtype, packed, batch_stats, images, labels):
  """Summed loss, correct predictions and count of one evaluation batch, the
  model running from packed parameters (``bq.dequantize_tree`` inside the step)."""
  model = nnx.merge(graphdef, bq.dequantize_tree(packed), batch_stats)
  model.eval()
  logits = model(input_pipeline.normalize(images, dtype))
  mask = labels >= 0
  safe = jnp.where(mask, labels, 0)
  sums = {"loss": jnp.sum(jnp.where(mask, cross_entropy(logits, safe), 0.0)),
          "correct": jnp.sum(mask & (jnp.argmax(logits, -1) == labels)),
          "count": jnp.sum(mask)}
  return dp.psum(jax.tree.map(lambda x: x.astype(jnp.float32), sums))


def run_evaluation(config: Config, dp: bq.DataParallel, classes, step_fn, step: int) -> dict:
  """Loss and accuracy over the validation set; ``step_fn(images, labels)``
  returns the (parallelized) sums of :func:`eval_sums`."""
  local_batch = config.batch_size // jax.process_count()
  n = (config.steps_per_eval if config.steps_per_eval > 0 else
       input_pipeline.eval_steps(config.data_dir, classes, config.batch_size))
  sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
  for batch in input_pipeline.eval_dataset(
      config.data_dir, classes, local_batch, n, image_size=config.image_size,
      resize_size=config.resize_size, num_threads=config.num_data_threads):
    batch = dp.shard_batch(batch)
    out = _host(dp, step_fn(batch["image"], batch["label"]))
    sums = {k: sums[k] + float(out[k]) for k in sums}
  result = {"step": step, "eval_loss": sums["loss"] / max(sums["count"], 1),
            "eval_accuracy": sums["correct"] / max(sums["count"], 1),
            "eval_images": int(round(sums["count"]))}
  logging.info("eval %s", result)
  return result


def evaluate_packed(config: Config, path: str) -> dict:
  """Validation loss and accuracy of the model in a packed file, as it is served.

  The model is rebuilt abstractly from ``config``; its packed parameters and
  batch-norm statistics are read from ``path`` (``bq.load_packed_model``, every
  leaf checked), placed for ``config.parallel`` and stay packed on the
  device; the evaluation step unpacks them inside the forward pass. On the
  same validation set the accuracy equals the training run's final
  ``eval_accuracy`` exactly.
  """
  config.validate()
  dp = bq.data_parallel(config.parallel)
  classes = input_pipeline.find_classes(config.data_dir)
  model = nnx.eval_shape(lambda: models.create_model(
      config.model, num_classes=len(classes), num_filters=config.num_filters,
      dtype=compute_dtype(config), axis_name=dp.axis_name, rngs=nnx.Rngs(config.seed)))
  graphdef, like, stats_like = nnx.split(model, nnx.Param, nnx.BatchStat)
  packed, batch_stats = bq.load_packed_model(path, like=like, extra_like=stats_like)
  device_bytes = sum(x.nbytes for x in jax.tree.leaves((packed, batch_stats)))
  float_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize
                    for x in jax.tree.leaves((like, stats_like)))
  packed, batch_stats = dp.replicate((packed, batch_stats))
  step = dp.parallelize(functools.partial(eval_sums, graphdef, dp, compute_dtype(config)),
                        batch_argnums=(2, 3))
  result = run_evaluation(config, dp, classes,
                          lambda images, labels: step(packed, batch_stats, images, labels), 0)
  del result["step"]
  return {**result, "device_bytes": device_bytes, "float_bytes": float_bytes}


def export_model(method, spec, state, path: str) -> None:
  """Writes the packed model (``ŵ`` bit-packed, with the batch-norm statistics)."""
  bq.save_packed(path, method.export(state["params"], spec, state["opt_state"]),
                 extra=state["batch_stats"])
  lines = []
  bq.size_report(path, print_fn=lines.append)
  logging.info("packed model %s:\n%s", path, "\n".join(lines))


def _host(dp: bq.DataParallel, tree):
  """One unreplicated copy as numpy (checkpoints, logs)."""
  return jax.device_get(dp.unreplicate(tree))


class TrainingStopped(ValueError):
  """Too many steps in a row were skipped (the run diverged)."""


def train_and_evaluate(config: Config, workdir: str, *, fresh: bool = False,
                       force: bool = False) -> dict[str, Any]:
  """Trains (resuming from ``workdir`` if it holds a checkpoint) and evaluates.

  A checkpoint of another config is refused with a one-line
  :class:`checkpointing.ResumeError` naming the field, unless ``fresh``
  (delete it, start over) or ``force`` (resume with this config).

  Returns a summary: ``start_step``, ``step``, the last logged train metrics,
  ``images_per_sec`` (global, compilation excluded) and the last eval metrics.
  """
  config.validate()
  config_cli.check_workdir(workdir)
  if fresh and jax.process_index() == 0:
    checkpointing.move_aside(workdir)
  dp = bq.data_parallel(config.parallel)
  if config.batch_size % jax.device_count():
    raise ValueError(f"batch_size {config.batch_size} must be divisible by the "
                     f"{jax.device_count()} devices")
  local_batch = config.batch_size // jax.process_count()
  dtype = compute_dtype(config)
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0

  ckpts = checkpointing.Checkpoints(
      os.path.join(workdir, "checkpoints"), dataclasses.asdict(config), free=FREE_ON_RESUME,
      defaults=dataclasses.asdict(Config()), max_to_keep=config.max_checkpoints_to_keep,
      force=force)
  ckpts.check_config()   # a changed config stops here, before data and compiling
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
  if config.init_from:
    params, batch_stats = load_init(config.init_from, params, batch_stats)
    logging.info("initialised from %s", config.init_from)
  state = {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params)}

  start_step = 0
  restored = ckpts.restore(jax.device_get(state))
  if restored is not None:
    start_step, state, _ = restored
    logging.info("resumed from %s at step %d", ckpts.directory, start_step)
    if ckpts.differs and start_step >= num_steps:
      raise checkpointing.ResumeError(
          f"{ckpts.differs}; that run is finished, so --force would train nothing and "
          "report a model made with the old config; use --fresh or another workdir")
  params, batch_stats, opt_state = dp.replicate(
      (state["params"], state["batch_stats"], state["opt_state"]))

  train_step, eval_step = make_steps(graphdef, spec, tx, dp, dtype, config.method)
  donate = (0, 1, 2) if jax.default_backend() != "cpu" else ()
  # One compiled step with BLAQ's lookahead and one without (blaq-m's off
  # steps, LAQ's cost); the host picks per step.
  p_train_steps = {on: dp.parallelize(functools.partial(train_step, lookahead=on),
                                      batch_argnums=(3, 4), donate_argnums=donate)
                   for on in (True, False)}
  method = methods.get(config.method)
  options = method_options(config, steps_per_epoch)
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
    return run_evaluation(config, dp, classes, lambda images, labels: p_eval_step(
        params, batch_stats, opt_state, images, labels), step)

  log_path = os.path.join(workdir, "metrics.jsonl")
  os.makedirs(workdir, exist_ok=True)
  if is_main:   # the log holds this run only, up to the step it resumes from
    checkpointing.truncate_jsonl(log_path, "step", start_step if start_step else None)

  run_hash = checkpointing.config_hash(dataclasses.asdict(config), FREE_ON_RESUME)

  def write(record):
    if is_main:
      checkpointing.append_jsonl(log_path, {**record, "config_hash": run_hash})

  summary = {"start_step": start_step, "step": start_step, "num_steps": num_steps}
  timer_step, timer_start, window = None, None, []
  skipped_before, consecutive = float(methods.skip_count(state["opt_state"])), 0
  for step in range(start_step, num_steps):
    batch = next(batches)
    params, batch_stats, opt_state, metrics = p_train_steps[method.lookahead_at(options, step)](
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
        totals = [float(m.pop("skipped_total")) for m in host]
        flags = [(t > prev) or not np.isfinite(m["loss"])
                 for t, prev, m in zip(totals, [skipped_before] + totals[:-1], host)]
        skipped_before = totals[-1]
        record["skipped_steps"], longest, consecutive = methods.skip_runs(flags, consecutive)
        record.update({k: float(np.mean([m[k] for m in host])) for k in host[0]})
        if longest >= config.max_consecutive_skips:
          ckpts.close()
          raise TrainingStopped(
              f"step {done}: {longest} consecutive steps were skipped (non-finite loss, "
              f"gradient or weights; config.max_consecutive_skips="
              f"{config.max_consecutive_skips}); the last checkpoint is kept: lower "
              "--learning-rate or check the data")
      if done > timer_step:
        record["images_per_sec"] = ((done - timer_step) * config.batch_size
                                    / (time.perf_counter() - timer_start))
      record["learning_rate"] = float(schedule(done))
      logging.info("train %s", record)
      write(record)
      summary.update(record)
      window = []
    if not config.synthetic and (done % eval_every == 0 or done == num_steps):
      summary.update(evaluate(done))
      write({k: v for k, v in summary.items() if k.startswith("eval") or k == "step"})
    if done % config.checkpoint_every_steps == 0 or done == num_steps:
      ckpts.save(done, _host(dp, {"params": params, "batch_stats": batch_stats,
                                  "opt_state": opt_state}), {"step": done})
    summary["step"] = done
  ckpts.close()
  summary["state"] = _host(dp, {"params": params, "batch_stats": batch_stats,
                               "opt_state": opt_state})
  if is_main:
    export_model(method, spec, summary["state"],
                 os.path.join(workdir, "model_packed.npz"))
  return summary
