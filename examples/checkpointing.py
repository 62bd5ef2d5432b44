"""One checkpoint manager for the examples, on ``orbax.checkpoint.CheckpointManager``.

A run directory holds ``checkpoints/<step>/`` (orbax: ``state``, the arrays a
resume needs, and ``meta``, a JSON record with the run's config and counters)
beside the example's logs. The rules, the same in every example:

* **Atomic saves.** Orbax writes a step into a temporary directory and renames
  it when complete, so a run killed during a save leaves the previous steps
  intact; leftover temporary directories are removed when the manager opens.
* **Fallback.** If the latest step cannot be read (a truncated or emptied
  file), it is deleted with a one-line warning and the previous one is used.
* **Resume checks the config.** A run resumes from the latest step only if its
  config equals the saved one, except for the fields the example lists as
  free (paths, logging, how far to run); otherwise it stops with one line
  naming the first differing field. ``force=True`` resumes anyway (with the
  new config), ``fresh=True`` deletes the old run and starts over.
* **Never mixes.** A new run in a directory holding another run's checkpoints
  is such a mismatch; logs are cut back to the step resumed from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

import jax


class ResumeError(ValueError):
  """The run directory holds a run that this one may not continue."""


def _plain(x):
  """``x`` as JSON would give it back (tuples become lists, ...)."""
  return json.loads(json.dumps(x))


def config_mismatch(saved: dict, current: dict, free: Iterable[str] = ()) -> Optional[str]:
  """The first field (in ``current``'s order) whose values differ, or None."""
  saved, current, free = _plain(saved), _plain(current), set(free)
  for key in list(current) + [k for k in saved if k not in current]:
    if key in free:
      continue
    if key not in saved or key not in current or saved[key] != current[key]:
      return key
  return None


def truncate_jsonl(path, key: str, upto) -> None:
  """Keeps the lines of a JSONL log whose ``key`` is <= ``upto`` (all if None:
  the file is removed); unreadable lines (a write cut short) are dropped."""
  path = Path(path)
  if not path.exists():
    return
  if upto is None:
    path.unlink()
    return
  rows = []
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict) and row.get(key, upto + 1) <= upto:
      rows.append(line + "\n")
  path.write_text("".join(rows))


class Checkpoints:
  """The checkpoints of one run directory.

  Args:
    directory: the checkpoint directory (``<workdir>/checkpoints``).
    config: the run's config as a dict (saved with every step, checked on resume).
    free: config fields that may differ on resume.
    max_to_keep: steps kept (the latest ones).
    fresh: delete existing checkpoints first (start the run over).
    force: resume even if the config differs.
  """

  def __init__(self, directory, config: dict, *, free: Iterable[str] = (),
               max_to_keep: int = 2, fresh: bool = False, force: bool = False):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.directory = Path(directory).resolve()
    self.config, self.free, self.force = _plain(config), tuple(free), force
    if jax.process_index() == 0:
      if fresh and self.directory.exists():
        shutil.rmtree(self.directory)
      for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):  # a save cut short
        shutil.rmtree(tmp, ignore_errors=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True))

  def save(self, step: int, state, meta: dict) -> None:
    """Saves ``state`` (a pytree of arrays) and ``meta`` (JSON) as ``step``."""
    ocp = self._ocp
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({"config": self.config, **meta})), force=True)

  def restore(self, like) -> Optional[tuple[int, Any, dict]]:
    """``(step, state, meta)`` of the latest readable step, or None if there is none.

    ``like`` is a pytree with the state's structure, shapes and dtypes.

    Raises:
      ResumeError: the saved config differs from this run's (unless ``force``).
    """
    ocp = self._ocp
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta
        field = config_mismatch(meta["config"], self.config, self.free)
        if field is not None and not self.force:
          raise ResumeError(
              f"{self.directory} holds a run with {field}="
              f"{meta['config'].get(field, '<unset>')!r}, this run has {field}="
              f"{self.config.get(field, '<unset>')!r}; use another workdir, --fresh to "
              "start over, or --force to resume anyway")
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(like))).state
      except ResumeError:
        raise
      except Exception as e:  # noqa: BLE001  (any unreadable step: fall back)
        logging.warning("checkpoint %s/%d is unreadable (%s: %s); deleting it and "
                        "trying the previous one", self.directory, step, type(e).__name__,
                        str(e).splitlines()[0][:200] if str(e) else "")
        print(f"checkpoint step {step} is unreadable ({type(e).__name__}); "
              "falling back to the previous one")
        self.manager.delete(step)
        continue
      meta.pop("config", None)
      return step, state, meta
    return None

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def directory_bytes(path) -> int:
  """Bytes of the files under ``path`` (the size of a checkpoint on disk)."""
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(path) for f in files)
