"""ResNet v1 in Flax NNX (He et al. 2016), laid out as torchvision's ResNet18.

The first convolution is ``conv_init`` and the classifier ``head``: the
default config quantizes those two at 8 bits and every other kernel at 1 or 2
bits. Convolutions have no bias (a BatchNorm follows each), so ResNet18 at
1000 classes has torchvision's 11,689,512 parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class ResNetBlock(nnx.Module):
  """Basic block: two 3x3 convolutions and an identity (or 1x1) shortcut."""

  def __init__(self, in_features: int, features: int, strides: int, *, conv, norm,
               rngs: nnx.Rngs):
    self.conv1 = conv(in_features, features, (3, 3), strides=strides, rngs=rngs)
    self.bn1 = norm(features, rngs=rngs)
    self.conv2 = conv(features, features, (3, 3), rngs=rngs)
    # A zero scale makes each residual branch start as the identity.
    self.bn2 = norm(features, scale_init=nnx.initializers.zeros_init(), rngs=rngs)
    if strides != 1 or in_features != features:
      self.proj = conv(in_features, features, (1, 1), strides=strides, rngs=rngs)
      self.proj_bn = norm(features, rngs=rngs)
    else:
      self.proj = self.proj_bn = None

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = x if self.proj is None else self.proj_bn(self.proj(x))
    return nnx.relu(shortcut + y)


class ResNet(nnx.Module):
  """ResNet v1 for ``[N, H, W, 3]`` images (already normalized)."""

  def __init__(self, stage_sizes: Sequence[int], num_classes: int, *,
               num_filters: int = 64, dtype: Any = jnp.float32,
               axis_name: str | None = None, rngs: nnx.Rngs):
    """
    Args:
      stage_sizes: blocks per stage; the filters double from one stage to the next.
      num_classes: outputs of ``head``.
      num_filters: filters of ``conv_init`` and of the first stage.
      dtype: compute dtype (``jnp.bfloat16`` on GPU/TPU); params stay float32.
      axis_name: the ``pmap`` axis over which BatchNorm averages its batch
        statistics (None under ``jit`` over a mesh, where the batch is global).
      rngs: initialization keys.
    """
    conv = functools.partial(nnx.Conv, use_bias=False, dtype=dtype,
                             param_dtype=jnp.float32, kernel_init=_conv_init)
    norm = functools.partial(nnx.BatchNorm, momentum=0.9, epsilon=1e-5, dtype=dtype,
                             param_dtype=jnp.float32, axis_name=axis_name)
    self.dtype = dtype
    self.conv_init = conv(3, num_filters, (7, 7), strides=2, padding=[(3, 3), (3, 3)],
                          rngs=rngs)
    self.bn_init = norm(num_filters, rngs=rngs)
    blocks = []
    in_features = num_filters
    for i, size in enumerate(stage_sizes):
      features = num_filters * 2**i
      for j in range(size):
        strides = 2 if i > 0 and j == 0 else 1
        blocks.append(ResNetBlock(in_features, features, strides, conv=conv, norm=norm,
                                  rngs=rngs))
        in_features = features
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(in_features, num_classes, dtype=dtype, param_dtype=jnp.float32,
                           rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn_init(self.conv_init(x.astype(self.dtype))))
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for block in self.blocks:
      x = block(x)
    x = jnp.mean(x, axis=(1, 2))
    return self.head(x).astype(jnp.float32)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
# One block: a model that compiles in seconds, for tests.
ResNet1 = functools.partial(ResNet, stage_sizes=(1,))

MODELS = {"ResNet18": ResNet18, "ResNet34": ResNet34, "ResNet1": ResNet1}


def create_model(name: str, **kwargs) -> ResNet:
  if name not in MODELS:
    raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
  return MODELS[name](**kwargs)


def param_count(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
