"""examples/checkpointing.py: atomic saves, fallback, config checks, a kill mid-save."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from examples import checkpointing

CONFIG = {"method": "blaq", "bits": 1, "seed": 0, "data_dir": "/a", "hidden": (8, 8)}
LIKE = {"w": np.zeros((4, 3), np.float32), "n": np.zeros([], np.int32)}


def _state(k):
  return {"w": np.full((4, 3), k, np.float32), "n": np.asarray(k, np.int32)}


def _saved(directory, steps, config=CONFIG):
  ckpts = checkpointing.Checkpoints(directory, config, max_to_keep=2)
  for k in steps:
    ckpts.save(k, _state(k), {"epoch": k})
  ckpts.close()


def test_resume_checks_the_config_and_names_the_field(tmp_path):
  _saved(tmp_path / "c", [1, 2])
  step, state, meta = checkpointing.Checkpoints(
      tmp_path / "c", dict(CONFIG, data_dir="/b"), free=["data_dir"]).restore(LIKE)
  assert (step, meta, int(state["n"])) == (2, {"epoch": 2}, 2)
  for change, field in ((dict(bits=2), "bits"), (dict(seed=1), "seed"),
                        (dict(hidden=(8, 9)), "hidden"), (dict(new=1), "new")):
    ckpts = checkpointing.Checkpoints(tmp_path / "c", dict(CONFIG, **change))
    with pytest.raises(checkpointing.ResumeError) as e:
      ckpts.restore(LIKE)
    assert f"holds a run with {field}=" in str(e.value) and "\n" not in str(e.value)
  # A field added to the config since the save blocks the resume only off its default.
  defaults = {"new": 0}
  grown = checkpointing.Checkpoints(tmp_path / "c", dict(CONFIG, new=0), defaults=defaults)
  assert grown.restore(LIKE)[0] == 2
  with pytest.raises(checkpointing.ResumeError, match="holds a run with new='<unset>', this "
                     "run has new=1"):
    checkpointing.Checkpoints(tmp_path / "c", dict(CONFIG, new=1),
                              defaults=defaults).restore(LIKE)
  forced = checkpointing.Checkpoints(tmp_path / "c", dict(CONFIG, bits=2), force=True)
  assert forced.restore(LIKE)[0] == 2
  fresh = checkpointing.Checkpoints(tmp_path / "c", dict(CONFIG, bits=2), fresh=True)
  assert fresh.restore(LIKE) is None and not list((tmp_path / "c").iterdir())


def test_a_damaged_latest_step_falls_back_to_the_previous(tmp_path, capsys):
  _saved(tmp_path / "c", [1, 2])
  for root, _, files in os.walk(tmp_path / "c" / "2"):   # empty every file of step 2
    for f in files:
      open(os.path.join(root, f), "w").close()
  os.makedirs(tmp_path / "c" / "3.orbax-checkpoint-tmp-1234" / "state")  # a cut-short save
  ckpts = checkpointing.Checkpoints(tmp_path / "c", CONFIG)
  step, state, _ = ckpts.restore(LIKE)
  assert step == 1 and int(state["n"]) == 1 and np.all(state["w"] == 1)
  assert "falling back" in capsys.readouterr().out
  ckpts.save(2, _state(5), {"epoch": 2})   # the run goes on from step 1
  ckpts.close()
  assert sorted(os.listdir(tmp_path / "c")) == ["1", "2"]
  assert int(checkpointing.Checkpoints(tmp_path / "c", CONFIG).restore(LIKE)[1]["n"]) == 5


def test_kill_during_a_save_then_resume(tmp_path):
  """A process SIGKILLed while orbax writes step 2 leaves step 1 usable."""
  script = textwrap.dedent(f"""
      import os, signal, sys
      import numpy as np
      sys.path.insert(0, {os.getcwd()!r})
      from examples import checkpointing
      ckpts = checkpointing.Checkpoints({str(tmp_path / "c")!r}, {CONFIG!r})
      ckpts.save(1, {{"w": np.full((4, 3), 1, np.float32), "n": np.asarray(1, np.int32),
                     "big": np.ones((1 << 22,), np.float32)}}, {{"epoch": 1}})
      ckpts.manager.wait_until_finished()
      ckpts.save(2, {{"w": np.full((4, 3), 2, np.float32), "n": np.asarray(2, np.int32),
                     "big": np.ones((1 << 22,), np.float32)}}, {{"epoch": 2}})
      os.kill(os.getpid(), signal.SIGKILL)   # while the save of step 2 runs
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == -9, proc.stderr[-2000:]
  like = dict(LIKE, big=np.zeros((1 << 22,), np.float32))
  step, state, meta = checkpointing.Checkpoints(tmp_path / "c", CONFIG).restore(like)
  assert step in (1, 2) and int(state["n"]) == step and meta == {"epoch": step}
  assert not [p for p in os.listdir(tmp_path / "c") if "tmp" in p]


def test_logs_are_cut_back_to_the_resumed_step(tmp_path):
  log = tmp_path / "m.jsonl"
  log.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3}\n{"epo')
  checkpointing.truncate_jsonl(log, "epoch", 2)
  assert log.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
  checkpointing.truncate_jsonl(log, "epoch", None)
  assert not log.exists()


def _damage(step_dir):
  for root, _, files in os.walk(step_dir):
    for f in files:
      open(os.path.join(root, f), "w").close()


def test_all_steps_damaged_is_an_error_and_deletes_nothing(tmp_path):
  _saved(tmp_path / "c", [1, 2])
  _damage(tmp_path / "c" / "1")
  _damage(tmp_path / "c" / "2")
  with pytest.raises(checkpointing.ResumeError) as e:
    checkpointing.Checkpoints(tmp_path / "c", CONFIG).restore(LIKE)
  message = str(e.value)
  assert "\n" not in message and "every checkpoint ([2, 1]) is unreadable" in message
  assert "--fresh" in message
  assert sorted(os.listdir(tmp_path / "c")) == ["1", "2"]


def test_force_never_deletes_a_run_it_cannot_continue(tmp_path):
  _saved(tmp_path / "c", [1, 2])
  other = {"w": np.zeros((5, 3), np.float32), "n": np.zeros([], np.int32)}  # another model
  ckpts = checkpointing.Checkpoints(tmp_path / "c", dict(CONFIG, hidden=(9, 9)), force=True)
  with pytest.raises(checkpointing.ResumeError) as e:
    ckpts.restore(other)
  message = str(e.value)
  assert "\n" not in message and "holds a run with hidden=[8, 8]" in message
  assert "its saved state does not fit this run's" in message
  assert sorted(os.listdir(tmp_path / "c")) == ["1", "2"]
  # A compatible forced resume records what differed.
  forced = checkpointing.Checkpoints(tmp_path / "c", dict(CONFIG, bits=2), force=True)
  assert forced.restore(LIKE)[0] == 2 and "bits=1" in forced.differs


def test_check_config_reads_only_the_record(tmp_path):
  _saved(tmp_path / "c", [1])
  checkpointing.Checkpoints(tmp_path / "c", CONFIG).check_config()
  with pytest.raises(checkpointing.ResumeError, match="holds a run with seed=0"):
    checkpointing.Checkpoints(tmp_path / "c", dict(CONFIG, seed=1)).check_config()
  checkpointing.Checkpoints(tmp_path / "c", dict(CONFIG, seed=1), force=True).check_config()


def test_move_aside_keeps_the_old_run(tmp_path):
  run = tmp_path / "run"
  assert checkpointing.move_aside(run) is None   # nothing there
  run.mkdir()
  (run / "summary.json").write_text("{}")
  assert checkpointing.move_aside(run) == tmp_path / "run.old-1"
  run.mkdir()
  (run / "x").write_text("")
  assert checkpointing.move_aside(run) == tmp_path / "run.old-2"
  assert (tmp_path / "run.old-1" / "summary.json").exists() and not run.exists()


def test_append_jsonl_never_leaves_half_a_row(tmp_path, monkeypatch):
  log = tmp_path / "metrics.jsonl"
  checkpointing.append_jsonl(log, {"epoch": 1})
  checkpointing.append_jsonl(log, {"epoch": 2})

  def killed(src, dst):
    raise KeyboardInterrupt   # a kill between writing the new file and renaming it

  monkeypatch.setattr(os, "replace", killed)
  with pytest.raises(KeyboardInterrupt):
    checkpointing.append_jsonl(log, {"epoch": 3})
  assert log.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'


def test_config_hash_ignores_free_fields():
  h = checkpointing.config_hash(CONFIG, free=["data_dir"])
  assert h == checkpointing.config_hash(dict(CONFIG, data_dir="/b"), free=["data_dir"])
  assert h != checkpointing.config_hash(dict(CONFIG, bits=2), free=["data_dir"])
  assert len(h) == 12
