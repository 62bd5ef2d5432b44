"""The paper's 2-bit ImageNet setting (first and last layers 8-bit)."""

from examples.imagenet_resnet18.configs import default


def get_config():
  config = default.get_config()
  config.bits = 2
  return config
