"""The paper's ImageNet setting: ResNet18, 1-bit weights, BLAQ a=0.9, m=10.

BLAQ runs the two-stage update in one epoch of every m=10 and LAQ in the
others (optimizer ``blaq-m``), as the paper does; ``--optimizer blaq`` runs it
on every step. ``paper_resnet18`` adds the paper's schedule and epochs.

The first convolution and the classifier are 8-bit, as the paper does for
Table 6 (reported top-1: 66.73% at 1 bit, 69.62% at 2 bits). The learning
rate, schedule length and batch size are not given in the paper's main text;
these are this example's choices for Adam-based LAQ/BLAQ.
"""

from examples.imagenet_resnet18.train import Config


def get_config() -> Config:
  return Config(model="ResNet18", bits=1, first_last_bits=8, optimizer="blaq-m", a=0.9,
                m=10, learning_rate=1e-3, warmup_epochs=5.0, num_epochs=100.0,
                batch_size=256, half_precision=True, parallel="jit")
