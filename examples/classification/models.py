"""The networks of the LAQ / BLAQ papers in Flax NNX, all with batch norm.

* :class:`MLP`: the 4-layer MNIST model of Hou et al. (2017) / BinaryConnect,
  784-2048-2048-2048-10 (BLAQ Table 3).
* :class:`LeNet5`: the modified LeNet5 of Qu et al. (2020),
  32C5-MP2-64C5-MP2-512FC-10 (BLAQ Table 4).
* :class:`VGGSmall`: the CIFAR-10 VGG of Hou et al. (2017),
  2x128C3-MP2-2x256C3-MP2-2x512C3-MP2-2x1024FC-10 (BLAQ Table 2).

Every hidden layer is conv/dense -> batch norm -> ReLU; the last layer is a
dense layer followed by batch norm (as in BinaryConnect / LAB). Models are
called as ``model(x, train=True|False)``; batch statistics are used and
updated when ``train`` is true.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

_BN = dict(momentum=0.9, epsilon=1e-5)


class MLP(nnx.Module):
  """Dense-BN-ReLU blocks and a dense-BN head."""

  def __init__(self, in_features: int = 784, hidden: Sequence[int] = (2048, 2048, 2048),
               num_classes: int = 10, *, rngs: nnx.Rngs):
    sizes = [in_features, *hidden]
    self.dense = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.norm = nnx.List([nnx.BatchNorm(b, **_BN, rngs=rngs) for b in hidden])
    self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)
    self.head_norm = nnx.BatchNorm(num_classes, **_BN, rngs=rngs)

  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    for dense, norm in zip(self.dense, self.norm):
      x = jax.nn.relu(norm(dense(x), use_running_average=not train))
    return self.head_norm(self.head(x), use_running_average=not train)


def _max_pool(x):
  return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))


class LeNet5(nnx.Module):
  """32C5-MP2-64C5-MP2-512FC-10 with batch norm ('valid' convolutions)."""

  def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
               *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(in_channels, 32, (5, 5), padding="VALID", rngs=rngs)
    self.norm1 = nnx.BatchNorm(32, **_BN, rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, (5, 5), padding="VALID", rngs=rngs)
    self.norm2 = nnx.BatchNorm(64, **_BN, rngs=rngs)
    side = ((image_size - 4) // 2 - 4) // 2
    self.fc = nnx.Linear(64 * side * side, 512, rngs=rngs)
    self.norm3 = nnx.BatchNorm(512, **_BN, rngs=rngs)
    self.head = nnx.Linear(512, num_classes, rngs=rngs)
    self.head_norm = nnx.BatchNorm(num_classes, **_BN, rngs=rngs)

  def __call__(self, x, train: bool = False):
    ura = not train
    x = _max_pool(jax.nn.relu(self.norm1(self.conv1(x), use_running_average=ura)))
    x = _max_pool(jax.nn.relu(self.norm2(self.conv2(x), use_running_average=ura)))
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(self.norm3(self.fc(x), use_running_average=ura))
    return self.head_norm(self.head(x), use_running_average=ura)


class VGGSmall(nnx.Module):
  """2x128C3-MP2-2x256C3-MP2-2x512C3-MP2-2x1024FC-10 with batch norm.

  ``width`` scales every layer (1.0 is the paper's model).
  """

  def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
               width: float = 1.0, *, rngs: nnx.Rngs):
    chans = [int(c * width) for c in (128, 128, 256, 256, 512, 512)]
    fcs = [int(1024 * width)] * 2
    ins = [in_channels, *chans[:-1]]
    self.convs = nnx.List([nnx.Conv(a, b, (3, 3), padding="SAME", rngs=rngs)
                           for a, b in zip(ins, chans)])
    self.conv_norms = nnx.List([nnx.BatchNorm(b, **_BN, rngs=rngs) for b in chans])
    side = image_size // 8
    sizes = [chans[-1] * side * side, *fcs]
    self.fcs = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.fc_norms = nnx.List([nnx.BatchNorm(b, **_BN, rngs=rngs) for b in fcs])
    self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)
    self.head_norm = nnx.BatchNorm(num_classes, **_BN, rngs=rngs)

  def __call__(self, x, train: bool = False):
    ura = not train
    for i, (conv, norm) in enumerate(zip(self.convs, self.conv_norms)):
      x = jax.nn.relu(norm(conv(x), use_running_average=ura))
      if i % 2 == 1:
        x = _max_pool(x)
    x = x.reshape(x.shape[0], -1)
    for fc, norm in zip(self.fcs, self.fc_norms):
      x = jax.nn.relu(norm(fc(x), use_running_average=ura))
    return self.head_norm(self.head(x), use_running_average=ura)


MODELS = {"mlp": MLP, "lenet5": LeNet5, "vgg_small": VGGSmall}


def create_model(name: str, *, seed: int, **kwargs) -> nnx.Module:
  """Builds model ``name`` (a key of :data:`MODELS`) with ``kwargs``."""
  if name not in MODELS:
    raise ValueError(f"create_model: unknown model {name!r}; expected one of {sorted(MODELS)}")
  return MODELS[name](**kwargs, rngs=nnx.Rngs(seed))


def count_params(model: nnx.Module) -> int:
  return sum(int(jnp.size(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
