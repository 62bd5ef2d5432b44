"""Throughput benchmark: the default model and method on random batches of
the real shape (224 px), no data on disk, no evaluation, a short run."""

from examples.imagenet_resnet18.configs import default


def get_config():
  config = default.get_config()
  config.synthetic = True
  config.num_train_steps = 50
  config.log_every_steps = 10
  config.checkpoint_every_steps = 10**9   # only the final one
  return config
