"""CIFAR-10, the VGG-small of Hou et al. 2017 (BLAQ Table 2).

2x128C3-MP2-2x256C3-MP2-2x512C3-MP2-2x1024FC-10, random crop + flip.
"""

from examples.classification.configs.base import Config


def get_config() -> Config:
  return Config(dataset="cifar10", model="vgg_small", num_epochs=200, batch_size=50,
                augment="crop_flip")
