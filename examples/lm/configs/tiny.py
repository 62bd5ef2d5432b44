"""A model small enough for the tests: 1 layer of width 32, context 32 bytes,
groups of 16, 64 KB of each split, a few steps."""

from examples.lm.configs import base


def get_config():
  return base.Config(num_layers=1, d_model=32, num_heads=2, mlp_ratio=2, seq_len=32,
                     group_size=16, batch_size=8, num_train_steps=6, warmup_steps=2,
                     steps_per_epoch=2, m=2, eval_every_steps=3, eval_batches=2,
                     max_corpus_bytes=65_536, checkpoint_every_steps=3)
