"""Fashion-MNIST, the LeNet5 of ``mnist_lenet5``."""

from examples.classification.configs.base import Config


def get_config() -> Config:
  return Config(dataset="fashion_mnist", model="lenet5", learning_rate=1e-2, num_epochs=50)
