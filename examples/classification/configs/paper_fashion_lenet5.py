"""The appendix's LeNet5 (20C3-MP2-50C3-MP2-500FC-10) on Fashion-MNIST, batch 128, 20 epochs.

The paper has no Fashion-MNIST run; this applies its MNIST protocol
(``configs/paper.py``) to the harder drop-in data set.
"""

from examples.classification.configs import paper


def get_config():
  return paper.paper_config("fashion_mnist", "lenet5_paper", batch_size=128, num_epochs=20)
