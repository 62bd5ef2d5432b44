"""The paper's CIFAR-10 VGG: (2×128C3)-MP2-(2×256C3)-MP2-(2×512C3)-MP2-(2×1024FC)-10,
batch 100, 100 epochs, 45k/5k split, no augmentation (BLAQ Table 2).

Protocol and schedule readings: ``configs/paper.py``.
"""

from examples.classification.configs import paper


def get_config():
  return paper.paper_config("cifar10", "vgg_small", batch_size=100, num_epochs=100)
