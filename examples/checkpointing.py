"""One checkpoint manager for the examples, on ``orbax.checkpoint.CheckpointManager``.

A run directory holds ``checkpoints/<step>/`` (orbax: ``state``, the arrays a
resume needs, and ``meta``, a JSON record with the run's config and counters)
beside the example's logs. The rules, the same in every example:

* **Atomic saves.** Orbax writes a step into a temporary directory and renames
  it when complete, so a run killed during a save leaves the previous steps
  intact; leftover temporary directories are removed when the manager opens.
* **Fallback.** If the latest step cannot be read (a truncated or emptied
  file), the previous one is used (with a one-line warning), and the
  unreadable one is deleted only then. If no step can be read, the run
  stops with one line; nothing is deleted.
* **Resume checks the config.** A run resumes from the latest step only if its
  config equals the saved one, except for the fields the example lists as
  free (paths, logging, how far to run); otherwise it stops with one line
  naming the first differing field (:meth:`Checkpoints.check_config` checks
  this from the JSON record alone, before any data is loaded).
  ``force=True`` resumes anyway (with the new config) if the saved state fits
  the new run, and otherwise stops naming the field, deleting nothing;
  ``fresh=True`` starts over (the examples move the old run aside first,
  :func:`move_aside`).
* **Never mixes.** A new run in a directory holding another run's checkpoints
  is such a mismatch; logs are cut back to the step resumed from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np


class ResumeError(ValueError):
  """The run directory holds a run that this one may not continue."""


def _plain(x):
  """``x`` as JSON would give it back (tuples become lists, ...)."""
  return json.loads(json.dumps(x))


def config_mismatch(saved: dict, current: dict, free: Iterable[str] = (),
                    defaults: dict | None = None) -> str | None:
  """The first field (in ``current``'s order) whose values differ, or None.

  A field that ``saved`` lacks (one added to the config since that run was
  saved) does not differ while ``current`` holds its value from ``defaults``.
  """
  saved, current, free = _plain(saved), _plain(current), set(free)
  defaults = _plain(defaults or {})
  for key in list(current) + [k for k in saved if k not in current]:
    if key in free:
      continue
    if key not in saved and key in defaults and current.get(key) == defaults[key]:
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
  write_atomic(path, "".join(rows))


class Checkpoints:
  """The checkpoints of one run directory.

  Args:
    directory: the checkpoint directory (``<workdir>/checkpoints``).
    config: the run's config as a dict (saved with every step, checked on resume).
    free: config fields that may differ on resume.
    defaults: the config's default values: a field added to the config after
      a run was saved does not block its resume while it keeps its default.
    max_to_keep: steps kept (the latest ones).
    fresh: delete existing checkpoints first (start the run over).
    force: resume even if the config differs.
  """

  def __init__(self, directory, config: dict, *, free: Iterable[str] = (),
               defaults: dict | None = None, max_to_keep: int = 2, fresh: bool = False,
               force: bool = False):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.directory = Path(directory).resolve()
    self.config, self.free, self.force = _plain(config), tuple(free), force
    self.defaults = defaults
    self.differs = None   # after a forced restore: what differed from the saved config
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

  def _mismatch(self, meta) -> str | None:
    """The one-line description of the first differing config field, or None."""
    field = config_mismatch(meta["config"], self.config, self.free, self.defaults)
    if field is None:
      return None
    return (f"{self.directory} holds a run with {field}="
            f"{meta['config'].get(field, '<unset>')!r}, this run has {field}="
            f"{self.config.get(field, '<unset>')!r}")

  def check_config(self) -> None:
    """Refuses a changed config from the latest step's JSON record alone (no
    arrays are read), so that a run stops before it loads data or compiles.

    Raises:
      ResumeError: the saved config differs (unless ``force``).
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps or self.force:
      return
    try:
      meta = self.manager.restore(steps[0], args=self._ocp.args.Composite(
          meta=self._ocp.args.JsonRestore())).meta
    except Exception:  # noqa: BLE001  (unreadable: restore() decides)
      return
    differs = self._mismatch(meta)
    if differs:
      raise ResumeError(f"{differs}; use another workdir, --fresh to start over, or "
                        "--force to resume anyway")

  def restore(self, like) -> tuple[int, Any, dict] | None:
    """``(step, state, meta)`` of the latest readable step, or None if there is none.

    ``like`` is a pytree with the state's structure, shapes and dtypes. A
    newer step that cannot be read is deleted only once an older one has been
    restored; nothing is deleted otherwise.

    Raises:
      ResumeError: the saved config differs from this run's (unless
        ``force``); with ``force``, a saved state that does not fit this
        run's (another model or method); every step is unreadable (start
        over with ``fresh``).
    """
    ocp = self._ocp
    unreadable = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      differs = None
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta
        differs = self._mismatch(meta)
        if differs is not None and not self.force:
          raise ResumeError(f"{differs}; use another workdir, --fresh to start over, or "
                            "--force to resume anyway")
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(like))).state
        _check_fits(state, like)
      except ResumeError:
        raise
      except Exception as e:  # noqa: BLE001  (any unreadable step: fall back)
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if differs is not None:
          raise ResumeError(f"{differs}, and its saved state does not fit this run's "
                            f"({reason}); --force resumes only a compatible run: use "
                            "another workdir or --fresh") from None
        logging.warning("checkpoint %s/%d is unreadable (%s); trying the previous one",
                        self.directory, step, reason)
        print(f"checkpoint step {step} is unreadable ({type(e).__name__}); "
              "falling back to the previous one")
        unreadable.append((step, reason))
        continue
      for bad, _ in unreadable:
        self.manager.delete(bad)
      meta.pop("config", None)
      self.differs = differs
      return step, state, meta
    if unreadable:
      steps = [s for s, _ in unreadable]
      raise ResumeError(f"{self.directory}: every checkpoint ({steps}) is unreadable "
                        f"({unreadable[0][1]}); nothing was deleted; use --fresh to start "
                        "over (the old run is moved aside)")
    return None

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _check_fits(state, like) -> None:
  """Raises ValueError unless ``state`` has ``like``'s tree, shapes and dtypes
  (orbax may hand back the saved shapes whatever the target says)."""
  if jax.tree.structure(state) != jax.tree.structure(like):
    raise ValueError("the saved state has another tree structure")
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(state)[0],
                          jax.tree.leaves(like)):
    if tuple(getattr(a, "shape", ())) != tuple(getattr(b, "shape", ())):
      raise ValueError(f"{jax.tree_util.keystr(path)} has shape {a.shape}, this run's "
                       f"{b.shape}")


def move_aside(workdir) -> Path | None:
  """Renames a non-empty ``workdir`` to ``<workdir>.old-<n>`` (the first
  free ``n``) before a fresh run writes anything; returns the new path (None
  if there was nothing to move). Nothing of the old run is deleted."""
  workdir = Path(workdir)
  if not workdir.is_dir() or not any(workdir.iterdir()):
    return None
  n = 1
  while (aside := workdir.with_name(f"{workdir.name}.old-{n}")).exists():
    n += 1
  workdir.rename(aside)
  print(f"--fresh: moved the old run in {workdir} to {aside}")
  return aside


def write_atomic(path, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file and ``os.replace``."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def savez_atomic(path, **arrays) -> None:
  """``np.savez(path, **arrays)`` through a temporary file and ``os.replace``."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp")
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


def append_jsonl(path, row: dict) -> None:
  """Appends ``row`` to a JSONL log by rewriting it atomically, so a run killed
  mid-write leaves the log as it was, never a half-written last row."""
  path = Path(path)
  old = path.read_text() if path.exists() else ""
  if old and not old.endswith("\n"):
    old += "\n"
  write_atomic(path, old + json.dumps(row) + "\n")


def config_hash(config: dict, free: Iterable[str] = ()) -> str:
  """A short hash of the config fields that define a run (``free`` ones left
  out); the artifacts of a run carry it, so files of two runs are told apart."""
  fields = {k: v for k, v in _plain(config).items() if k not in set(free)}
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def directory_bytes(path) -> int:
  """Bytes of the files under ``path`` (the size of a checkpoint on disk)."""
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(path) for f in files)
