"""The paper's ImageNet setting: ResNet18, 1-bit weights, BLAQ a=0.9, m=10.

BLAQ runs the two-stage update in one epoch of every m=10 and LAQ in the
others (method ``blaq-m``), as the paper does; ``--method blaq`` runs it
on every step. ``paper_resnet18`` adds the paper's schedule and epochs.

The first convolution and the classifier are 8-bit, as the paper does for
Table 6 (reported top-1: 66.73% at 1 bit, 69.62% at 2 bits). The learning
rate, schedule length and batch size are not given in the paper's main text;
these are this example's choices for Adam-based LAQ/BLAQ.
"""

from examples.imagenet_resnet18.train import Config


def get_config() -> Config:
  return Config()   # the defaults of train.Config are this setting
