"""The CPU-sized model: 2 layers, width 128, 4 heads, context 128 bytes; 2-bit
kernels in groups of 64, embeddings and head at 8 bits; 1,500 steps of batch 16."""

from examples.lm.configs import base


def get_config():
  return base.Config()
