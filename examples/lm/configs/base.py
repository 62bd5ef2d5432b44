"""The LM example's config: one dataclass, its defaults and its checks.

``configs/*.py`` return a :class:`Config` with the fields that differ; they
import nothing from the training code.
"""

from __future__ import annotations

import dataclasses

from examples import config_cli

METHODS = ("fp", "bwn-ste", "laq", "blaq", "blaq-m")


@dataclasses.dataclass
class Config:
  """A byte-level decoder-only transformer on the Python standard library's source.

  Quantization: every attention and MLP kernel at ``bits`` with one scale per
  group of ``group_size`` input weights per output channel (None: one per
  output channel); the token and position embeddings and the output head at
  ``embed_bits``, one scale per channel. Biases and layer norms stay in float.
  """

  method: str = "laq"
  bits: int = 2
  group_size: int | None = 64
  embed_bits: int = 8
  a: float = 0.6                     # BLAQ's mixing weight
  m: int = 5                         # blaq-m: the lookahead in one "epoch" of every m
  steps_per_epoch: int = 100         # blaq-m's epoch (the corpus is sampled, not swept)
  # Model.
  num_layers: int = 2
  d_model: int = 128
  num_heads: int = 4
  mlp_ratio: int = 4
  seq_len: int = 128
  # Training.
  batch_size: int = 16
  learning_rate: float = 2e-3
  warmup_steps: int = 100
  num_train_steps: int = 1500
  seed: int = 0
  # Evaluation: validation bits per byte on eval_batches fixed windows.
  eval_every_steps: int = 500
  eval_batches: int = 16
  # Data: the *.py files under corpus_dir (None: the running interpreter's
  # standard library); max_corpus_bytes caps each split (tiny configs).
  corpus_dir: str | None = None
  max_corpus_bytes: int | None = None
  # Devices on the FSDP mesh axis (0: all): params, optimizer state and the
  # batch are split along it.
  fsdp_devices: int = 0
  checkpoint_every_steps: int = 500

  def validate(self) -> Config:
    """Checks every field (one line naming the field and its flag); returns self."""
    config_cli.check_choice(self, "method", METHODS)
    for name, hi in (("bits", 8), ("embed_bits", 8)):
      config_cli.check_number(self, name, lo=1, hi=hi, integer=True)
    config_cli.check_number(self, "group_size", lo=1, integer=True, none_ok=True)
    config_cli.check_number(self, "a", lo=0, hi=1)
    for name in ("m", "steps_per_epoch", "num_layers", "d_model", "num_heads", "mlp_ratio",
                 "seq_len", "batch_size", "num_train_steps", "eval_every_steps",
                 "eval_batches", "checkpoint_every_steps"):
      config_cli.check_number(self, name, lo=1, integer=True)
    for name in ("warmup_steps", "seed", "fsdp_devices"):
      config_cli.check_number(self, name, lo=0, integer=True)
    config_cli.check_number(self, "learning_rate", lo=0)
    config_cli.check_number(self, "max_corpus_bytes", lo=self.seq_len + 2, integer=True,
                            none_ok=True)
    if self.warmup_steps >= self.num_train_steps:
      raise ValueError(f"config.warmup_steps {self.warmup_steps} must be below "
                       f"config.num_train_steps {self.num_train_steps} (--set warmup_steps=N)")
    if self.d_model % self.num_heads:
      raise ValueError(f"config.d_model {self.d_model} must be a multiple of config.num_heads "
                       f"{self.num_heads}")
    return self
