"""Training and evaluation of the byte-level LM, fully sharded (FSDP).

``train_step`` and ``eval_step`` are module-level and jitted by
:func:`train_and_evaluate`. The step of every method comes from the shared
registry (``examples/methods.py``); BLAQ's lookahead is decided on the host
(two compiled steps; blaq-m runs it in one "epoch" of ``steps_per_epoch``
steps in every ``m``).

**Sharding.** One mesh axis ``"fsdp"`` over ``config.fsdp_devices`` devices.
Each parameter is split along its largest axis that the device count
divides (replicated if none does); the optimizer state follows its
parameter (:func:`state_shardings`), and the batch is split along its first
axis. ``jax.jit`` with these ``NamedSharding``\\ s leaves the collectives to
XLA's SPMD partitioner; the step's outputs are pinned to the inputs'
shardings, so nothing is silently replicated.
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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import blaq_jax as bq
from examples import checkpointing
from examples import methods
from examples.lm import input_pipeline
from examples.lm import models
from examples.lm.configs.base import Config

FREE_ON_RESUME = ("num_train_steps", "corpus_dir", "eval_every_steps", "checkpoint_every_steps")
AXIS = "fsdp"


class Context(NamedTuple):
  """What the steps need besides the arrays (closed over, not traced)."""

  graphdef: Any
  spec: Any
  tx: optax.GradientTransformation
  method: methods.Method
  options: methods.Options


def build_model(config: Config, seed: int) -> models.TransformerLM:
  return models.TransformerLM(input_pipeline.VOCAB_SIZE, config.d_model, config.num_layers,
                              config.num_heads, config.mlp_ratio, config.seq_len,
                              rngs=nnx.Rngs(seed))


def make_spec(config: Config, params):
  """Kernels at ``bits`` in groups of ``group_size`` (per channel if None);
  embeddings and head at ``embed_bits`` per channel."""
  embed = bq.QuantSpec(config.embed_bits, per_channel=True)
  kernels = dict(per_channel=True)
  if config.group_size is not None:
    kernels = dict(group_size=config.group_size)
  return bq.quant_spec(params, bits=config.bits, **kernels,
                       overrides={"embed": embed, "head": embed})


def make_optimizer(config: Config, spec, options: methods.Options):
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, config.warmup_steps, config.num_train_steps,
      end_value=0.1 * config.learning_rate)
  return methods.get(config.method).optimizer(schedule, spec, options)


def loss_fn(graphdef, params, tokens):
  """Mean next-byte cross-entropy (nats) of ``tokens [B, T+1]``."""
  logits = nnx.merge(graphdef, params)(tokens[:, :-1])
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           tokens[:, 1:])
  return jnp.mean(losses), None


def train_step(ctx: Context, state: dict, tokens, step, lookahead: bool):
  """One step of the method: ``(new state, loss)``."""
  updates, opt_state, loss, _ = ctx.method.step(
      ctx.tx, ctx.spec, state["params"], state["opt_state"],
      functools.partial(loss_fn, ctx.graphdef, tokens=tokens), count=step,
      options=ctx.options, lookahead=lookahead)
  params = optax.apply_updates(state["params"], updates)
  return {"params": params, "opt_state": opt_state}, loss


def eval_step(ctx: Context, state: dict, tokens):
  """Mean cross-entropy (nats) of the next byte over ``tokens``, at ``ŵ``."""
  weights = ctx.method.weights(state["params"], ctx.spec, state["opt_state"])
  return loss_fn(ctx.graphdef, weights, tokens)[0]


def make_mesh(config: Config) -> jax.sharding.Mesh:
  n = config.fsdp_devices or jax.device_count()
  if n > jax.device_count():
    raise ValueError(f"config.fsdp_devices {n} > the {jax.device_count()} devices; lower "
                     "--set fsdp_devices")
  if config.batch_size % n:
    raise ValueError(f"config.batch_size {config.batch_size} must be a multiple of the {n} "
                     "FSDP devices; change --batch-size or --set fsdp_devices")
  return jax.make_mesh((n,), (AXIS,), devices=jax.devices()[:n],
                       axis_types=(jax.sharding.AxisType.Auto,))


def fsdp_spec(shape, n: int) -> P:
  """Split the largest axis that ``n`` divides (ties: the first); else replicate."""
  axes = [i for i, size in enumerate(shape) if size % n == 0 and size >= n]
  if n == 1 or not axes:
    return P()
  axis = max(axes, key=lambda i: (shape[i], -i))
  return P(*[AXIS if i == axis else None for i in range(len(shape))])


def state_shardings(state, mesh):
  """A ``NamedSharding`` per leaf: a leaf of a parameter's shape (the
  parameter, its moments, its curvature) is split as that parameter is
  (:func:`fsdp_spec`); any other leaf (scales, counters) is replicated."""
  n = mesh.devices.size
  shapes = {np.shape(x) for x in jax.tree.leaves(state["params"])}
  return jax.tree.map(lambda x: NamedSharding(
      mesh, fsdp_spec(np.shape(x), n) if np.shape(x) in shapes else P()), state)


def bytes_per_device(tree) -> dict:
  """Bytes each device holds of ``tree``'s arrays (from their addressable shards)."""
  out: dict = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
  return out


def train_and_evaluate(config: Config, workdir, *, fresh: bool = False,
                       force: bool = False) -> dict:
  """Trains (resuming from ``workdir``'s checkpoint), evaluates and writes
  ``metrics.jsonl`` and ``summary.json``; returns the summary with the state."""
  config.validate()
  workdir = Path(workdir)
  if fresh:
    checkpointing.move_aside(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  ckpts = checkpointing.Checkpoints(
      workdir / "checkpoints", dataclasses.asdict(config), free=FREE_ON_RESUME,
      defaults=dataclasses.asdict(Config()), max_to_keep=2, force=force)
  ckpts.check_config()
  mesh = make_mesh(config)
  corpus = input_pipeline.load_corpus(config.corpus_dir, config.max_corpus_bytes)
  for split in ("train", "val"):
    input_pipeline.check_length(corpus[split], config.seq_len, split)

  method = methods.get(config.method)
  options = methods.Options(a=config.a, m=config.m, steps_per_epoch=config.steps_per_epoch)
  graphdef, params = nnx.split(build_model(config, config.seed), nnx.Param)
  spec = make_spec(config, params)
  tx = make_optimizer(config, spec, options)
  ctx = Context(graphdef, spec, tx, method, options)
  state = {"params": params, "opt_state": tx.init(params)}
  shardings = state_shardings(state, mesh)
  state = jax.device_put(state, shardings)
  batch_sharding = NamedSharding(mesh, P(AXIS))
  steps = {on: jax.jit(functools.partial(train_step, ctx, lookahead=on), donate_argnums=0,
                       out_shardings=(shardings, None))
           for on in ((False, True) if method.lookahead else (False,))}
  evaluate_batch = jax.jit(functools.partial(eval_step, ctx))

  start, train_s = 0, 0.0
  restored = ckpts.restore(jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings))
  if restored is not None:
    start, state, meta = restored
    train_s = meta["train_s"]
    print(f"resumed from step {start}")
  log_path = workdir / "metrics.jsonl"
  checkpointing.truncate_jsonl(log_path, "step", start if start else None)
  val = input_pipeline.eval_batches(corpus["val"], config.batch_size, config.seq_len,
                                    config.eval_batches)

  def validation_bpb(state):   # the windows are all the same size
    losses = [float(evaluate_batch(state, jax.device_put(t, batch_sharding))) for t in val]
    return float(np.mean(losses)) / math.log(2)

  losses, step_times, row = [], [], {}
  for step in range(start, config.num_train_steps):
    tokens = jax.device_put(input_pipeline.train_batch(
        corpus["train"], config.batch_size, config.seq_len, config.seed, step), batch_sharding)
    t0 = time.perf_counter()
    state, loss = steps[method.lookahead_at(options, step)](state, tokens, step)
    loss = float(loss)             # waits for the step
    dt = time.perf_counter() - t0
    if step > start:               # the first step compiles
      train_s += dt
      step_times.append(dt)
    losses.append(loss)
    done = step + 1
    if done % config.eval_every_steps == 0 or done == config.num_train_steps:
      row = {"step": done, "train_loss_bpb": float(np.mean(losses)) / math.log(2),
             "val_bpb": validation_bpb(state), "train_s": round(train_s, 3),
             "grad_evals": method.grad_evals(options, done)}
      losses = []
      checkpointing.append_jsonl(log_path, row)
      print(f"step {done}: train {row['train_loss_bpb']:.3f} bpb, val {row['val_bpb']:.3f} "
            f"bpb ({train_s:.1f}s)", flush=True)
    if done % config.checkpoint_every_steps == 0 or done == config.num_train_steps:
      ckpts.save(done, state, {"train_s": train_s})
  ckpts.close()

  sizes = bq.size_report(method.export(state["params"], spec, state["opt_state"]),
                         print_fn=None)
  per_device = bytes_per_device(state)
  summary = {
      "method": config.method, "bits": config.bits, "group_size": config.group_size,
      "val_bpb": row.get("val_bpb"), "steps": config.num_train_steps,
      "train_s": round(train_s, 3),
      "step_ms_median": round(1e3 * float(np.median(step_times)), 3) if step_times else None,
      "packed_bytes": sizes["packed_bytes"], "fp32_bytes": sizes["fp32_bytes"],
      "devices": mesh.devices.size, "state_bytes_per_device_max": max(per_device.values()),
      "corpus_bytes": {k: int(len(corpus[k])) for k in ("train", "val")},
      "corpus_files": corpus["files"],
      "config_hash": checkpointing.config_hash(dataclasses.asdict(config), FREE_ON_RESUME),
  }
  checkpointing.write_atomic(workdir / "summary.json", json.dumps(summary, indent=1))
  return {**summary, "state": state}
