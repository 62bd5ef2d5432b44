"""MNIST, the 4-layer MLP 784-2048-2048-2048-10 of Hou et al. (BLAQ Table 3)."""

from examples.classification.configs.base import Config


def get_config() -> Config:
  return Config(model_kwargs={"hidden": (2048, 2048, 2048)}, learning_rate=1e-2,
                num_epochs=50)
