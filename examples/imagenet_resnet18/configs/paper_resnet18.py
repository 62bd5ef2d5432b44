"""The BLAQ paper's ImageNet protocol (appendix section 7, ALQ's set-up).

ResNet18, 1-bit weights with the first convolution and the classifier at 8
bits, batch 256, 175 epochs, Adam-scale learning rate 2e-4 decayed ×0.95 per
epoch (no warm-up), BLAQ with the two-stage update in one epoch of every
``m = 10`` and ``a = 0.9`` (``method="blaq-m"``, which needs
``bq.periodic_lookahead``). ALQ, whose protocol the paper follows, starts from
a pretrained full-precision ResNet18: pass it with ``--init-from`` (an
``.npz`` of ``train.save_params_npz`` or an orbax step directory of an
``--method fp`` run of this example).
"""

from examples.imagenet_resnet18.train import Config


def get_config() -> Config:
  return Config(learning_rate=2e-4, lr_schedule="exponential", warmup_epochs=0.0,
                num_epochs=175.0)
