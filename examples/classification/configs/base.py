"""The classification example's config: one dataclass, its defaults and its checks.

``configs/*.py`` return a :class:`Config` with the fields that differ; they
import nothing from the training code. :func:`resolve` turns ``config.method``
into the registry's entry (``examples/methods.py``), the options it reads and
the epochs the run trains: the one place where the config's method fields
are read.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from examples import config_cli
from examples import methods
from examples.classification import input_pipeline
from examples.classification import models

LOSSES = ("cross_entropy", "squared_hinge")
LR_SCHEDULES = ("cosine", "constant", "step", "step_every", "exponential")

# Fields that may change when a run resumes (where the data is, what to write,
# how far to go this time); any other change refuses to resume.
FREE_ON_RESUME = ("stop_after_epoch", "data_dir", "download", "checkpoint", "export", "plot",
                  "progress", "max_consecutive_skips")


@dataclasses.dataclass
class Config:
  """Everything a run depends on (``configs/*.py`` return one)."""

  dataset: str = "mnist"
  model: str = "mlp"
  model_kwargs: dict = dataclasses.field(default_factory=dict)
  method: str = "blaq"            # a name of examples/methods.py
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
  # "exponential" (×lr_decay per epoch). Epochs scale with the method's run_scale.
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

  def validate(self) -> Config:
    """Checks every field (one line naming the field and its flag); returns self."""
    config_cli.check_choice(self, "method", tuple(methods.METHODS))
    config_cli.check_choice(self, "dataset", input_pipeline.DATASETS)
    config_cli.check_choice(self, "model", tuple(sorted(models.MODELS)))
    config_cli.check_choice(self, "lr_schedule", LR_SCHEDULES)
    config_cli.check_choice(self, "loss", LOSSES)
    config_cli.check_choice(self, "scheme", ("linear", "log", "ternary"))
    config_cli.check_choice(self, "augment", (None, "crop_flip"))
    check = config_cli.check_number
    check(self, "learning_rate", lo=0)
    check(self, "a", lo=0, hi=1)
    check(self, "bits", lo=1, hi=8, integer=True)
    check(self, "seed", lo=0, integer=True)
    for name in ("num_epochs", "batch_size", "eval_batch_size", "m", "lr_decay_every",
                 "track_last_epochs", "max_consecutive_skips"):
      check(self, name, lo=1, integer=True)
    for name in ("val_split", "track_weights"):
      check(self, name, lo=0, integer=True)
    for name in ("train_subset", "test_subset", "stop_after_epoch"):
      check(self, name, lo=1, integer=True, none_ok=True)
    if self.lookahead_phase is not None:
      check(self, "lookahead_phase", lo=0, hi=self.m - 1, integer=True)
    for name in ("dampen_weight", "freeze_threshold"):
      check(self, name, lo=0)
    check(self, "blend_end", lo=0, hi=1, lo_open=True)
    check(self, "lr_decay", lo=0, lo_open=True)
    config_cli.check_kwargs(self, "model_kwargs", models.MODELS[self.model])
    return self


class Resolved(NamedTuple):
  """``config.method`` resolved once: the registry's entry, the options it
  reads, and the epochs the run trains (``num_epochs`` times the entry's
  ``run_scale``: more for LAQ at BLAQ's gradient budget)."""

  method: methods.Method
  options: methods.Options
  epochs: int


def resolve(config: Config, steps_per_epoch: int = 1) -> Resolved:
  """The method of ``config`` with its options (``steps_per_epoch``: blaq-m's
  period and alpha-blending's length are counted in steps)."""
  method = methods.get(config.method)
  options = methods.Options(
      a=config.a, m=config.m, lookahead_phase=config.lookahead_phase,
      steps_per_epoch=steps_per_epoch, dampen_weight=config.dampen_weight,
      freeze_threshold=config.freeze_threshold,
      blend_steps=max(1, int(config.blend_end * config.num_epochs * steps_per_epoch)))
  epochs = max(1, int(round(config.num_epochs * method.run_scale(options))))
  return Resolved(method, options, epochs)


def from_dict(saved: dict) -> Config:
  """The config a run saved (``config.json``); fields it lacks keep their defaults."""
  names = {f.name for f in dataclasses.fields(Config)}
  return Config(**{k: v for k, v in saved.items() if k in names})
