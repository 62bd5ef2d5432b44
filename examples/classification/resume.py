"""What a checkpoint of the classification example holds, and how a run resumes.

The checkpoint (``examples/checkpointing.py``, one per epoch in
``<workdir>/checkpoints/<epoch>``) holds what a resume needs and nothing
more: the params, the batch statistics, the method's optimizer state and the
part of the oscillation tracker's state an epoch's end does not fix; its
JSON record holds the run's config, the epoch, step and training seconds,
and every metrics row so far (a damaged log is rebuilt from it).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from examples import checkpointing
from examples import metrics_io
from examples.classification.configs.base import FREE_ON_RESUME
from examples.classification.configs.base import Config


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


def open_checkpoints(config: Config, workdir: Path, *, force: bool = False):
  """The run's checkpoints (None if it keeps none and has none), its config
  checked against the latest one's before any data is read or compiled.

  Raises:
    checkpointing.ResumeError: the workdir holds a run of another config
      (unless ``force``).
  """
  if not (config.checkpoint or (workdir / "checkpoints").exists()):
    return None
  ckpts = checkpointing.Checkpoints(
      workdir / "checkpoints", dataclasses.asdict(config), free=FREE_ON_RESUME,
      defaults=dataclasses.asdict(Config()), max_to_keep=2, force=force)
  ckpts.check_config()
  return ckpts


def checkpoint_state(state) -> dict:
  """What a checkpoint holds of the training state (taken at an epoch's end)."""
  inner, tracker = state["opt_state"]
  fields = {f: getattr(tracker, f) for f in _TrackerCheckpoint._fields}
  fields["codes"] = jax.tree.map(lambda c: c.astype(jnp.uint8), tracker.codes)
  return {"params": state["params"], "batch_stats": state["batch_stats"],
          "opt_state": inner, "tracker": _TrackerCheckpoint(**fields)}


def state_from_checkpoint(saved: dict, tx) -> dict:
  """The full training state of :func:`checkpoint_state`'s output (``tx``: the
  chain of the method's optimizer and the oscillation tracker)."""
  params = saved["params"]
  tracker = tx.init(params)[1]   # window extremes = params, counters 0
  kept = saved["tracker"]._replace(
      codes=jax.tree.map(lambda c: jnp.asarray(c, jnp.int32), saved["tracker"].codes))
  return {"params": params, "batch_stats": saved["batch_stats"],
          "opt_state": (saved["opt_state"], tracker._replace(**kept._asdict()))}


class Resumed(NamedTuple):
  state: dict
  epoch: int
  step: int
  train_s: float
  rows: list          # the metrics rows up to ``epoch``


def resume(ckpts, state: dict, tx, workdir: Path) -> Resumed:
  """Restores the latest readable checkpoint into ``state`` (kept as it is if
  there is none) and cuts ``metrics.jsonl`` and ``step_losses.jsonl`` back to
  its epoch (empties them without one), so that the logs hold this run only;
  a damaged or cut metrics log is rebuilt from the checkpoint's rows."""
  epoch, step, train_s, saved_rows = 0, 0, 0.0, None
  if ckpts is not None:
    restored = ckpts.restore(jax.eval_shape(lambda: checkpoint_state(state)))
    if restored is not None:
      _, saved, meta = restored
      state = state_from_checkpoint(saved, tx)
      epoch, step, train_s = meta["epoch"], meta["step"], meta["train_s"]
      saved_rows = meta.get("metrics")
      print(f"resumed from epoch {epoch} (step {step})")
  metrics_path = workdir / "metrics.jsonl"
  for path in (metrics_path, workdir / "step_losses.jsonl"):
    checkpointing.truncate_jsonl(path, "epoch", epoch)
  rows = [r for r in metrics_io.read_jsonl(metrics_path) if r["epoch"] <= epoch]
  if saved_rows is not None and rows != saved_rows:
    print(f"{metrics_path}: {len(saved_rows) - len(rows)} missing or damaged row(s) "
          "restored from the checkpoint")
    checkpointing.write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in saved_rows))
    rows = saved_rows
  return Resumed(state, epoch, step, train_s, rows)
