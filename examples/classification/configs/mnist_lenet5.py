"""MNIST, LeNet5 32C5-MP2-64C5-MP2-512FC-10 of Qu et al. 2020 (BLAQ Table 4)."""

from examples.classification.configs.base import Config


def get_config() -> Config:
  return Config(model="lenet5", learning_rate=1e-2, num_epochs=50)
