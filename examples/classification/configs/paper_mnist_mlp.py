"""The paper's MNIST MLP: 784-2048-2048-2048-10, batch 100, 50 epochs (BLAQ Table 3).

Protocol and schedule readings: ``configs/paper.py``.
"""

from examples.classification.configs import paper


def get_config():
  return paper.paper_config("mnist", "mlp", batch_size=100, num_epochs=50,
                            model_kwargs={"hidden": (2048, 2048, 2048)})
