"""The appendix's LeNet5 on MNIST: 20C3-MP2-50C3-MP2-500FC-10, batch 128, 20 epochs.

Protocol and schedule readings: ``configs/paper.py``.
"""

from examples.classification.configs import paper


def get_config():
  return paper.paper_config("mnist", "lenet5_paper", batch_size=128, num_epochs=20)
