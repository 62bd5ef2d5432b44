"""The networks of the LAQ / BLAQ papers in Flax NNX, all with batch norm.

* :class:`MLP`: the 4-layer MNIST model of Hou et al. (2017) / BinaryConnect,
  784-2048-2048-2048-10 (BLAQ Table 3).
* :class:`LeNet5`: the modified LeNet5 of Qu et al. (2020),
  32C5-MP2-64C5-MP2-512FC-10 (BLAQ Table 4).
* :class:`VGGSmall`: the CIFAR-10 VGG of Hou et al. (2017),
  2x128C3-MP2-2x256C3-MP2-2x512C3-MP2-2x1024FC-10 (BLAQ Table 2).
* :class:`LeNet5Paper`: the BLAQ appendix's LeNet5, 20C3-MP2-50C3-MP2-500FC-10
  (3x3 'valid' convolutions: 28 -> 26 -> 13 -> 11 -> 5, so the FC layer sees
  50·5·5 = 1250 features; the appendix does not give the padding).

Every hidden layer is conv/dense -> batch norm -> ReLU; the last layer is a
dense layer followed by batch norm (as in BinaryConnect / LAB; ``head_norm=False``
drops that one). Models are called as ``model(x, train=True|False)``; batch
statistics are used and updated when ``train`` is true.

Batch norm, two forms (keyword ``bn_eps_on_std``):

* ``False`` (default): Flax's ``nnx.BatchNorm``, ``(x - μ) / sqrt(σ² + ε)``
  with ``ε = bn_eps`` (1e-5);
* ``True``: :class:`StdEpsBatchNorm`, ``(x - μ) / (σ + ε)``, ε added to the
  standard deviation as the LAB/LAQ reference code (BinaryConnect's layer)
  does, with ``ε = 1e-4`` in the ``paper_*`` configs. Both keep running
  averages of the mean and the *variance* with factor 0.1 (momentum 0.9); the
  reference code averages the standard deviation instead, which differs only
  in the evaluation-time statistics (by Jensen, ``sqrt(E σ²) ≥ E σ``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

_BN = dict(momentum=0.9, epsilon=1e-5)


class StdEpsBatchNorm(nnx.Module):
  """Batch norm with ε on the standard deviation: ``γ (x - μ) / (σ + ε) + β``.

  Normalises over every axis but the last (features). Parameters ``scale``,
  ``bias`` and batch statistics ``mean``, ``var`` are named as in
  ``nnx.BatchNorm`` so that specs, exports and checkpoints treat both alike.
  """

  def __init__(self, num_features: int, *, momentum: float = 0.9, epsilon: float = 1e-4,
               rngs: nnx.Rngs = None):
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.momentum = momentum
    self.epsilon = epsilon

  def __call__(self, x, use_running_average: bool = False):
    if use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axes)
      var = jnp.mean(jnp.square(x - mean), axes)
      m = self.momentum
      self.mean[...] = m * self.mean[...] + (1 - m) * mean
      self.var[...] = m * self.var[...] + (1 - m) * var
    # max(σ², tiny): a zero-variance feature gets a finite (zero) gradient.
    std = jnp.sqrt(jnp.maximum(var, 1e-30))
    return (x - mean) / (std + self.epsilon) * self.scale[...] + self.bias[...]


def _norm_factory(bn_eps_on_std: bool, bn_eps: float | None):
  if bn_eps_on_std:
    eps = 1e-4 if bn_eps is None else bn_eps
    return lambda n, rngs: StdEpsBatchNorm(n, momentum=0.9, epsilon=eps, rngs=rngs)
  kw = dict(_BN) if bn_eps is None else dict(_BN, epsilon=bn_eps)
  return lambda n, rngs: nnx.BatchNorm(n, **kw, rngs=rngs)


def _head_norm(norm, num_classes, head_norm: bool, rngs):
  return norm(num_classes, rngs) if head_norm else None


def _apply_head_norm(module, x, ura):
  return x if module.head_norm is None else module.head_norm(x, use_running_average=ura)


class MLP(nnx.Module):
  """Dense-BN-ReLU blocks and a dense-BN head."""

  def __init__(self, in_features: int = 784, hidden: Sequence[int] = (2048, 2048, 2048),
               num_classes: int = 10, *, head_norm: bool = True, bn_eps_on_std: bool = False,
               bn_eps: float | None = None, rngs: nnx.Rngs):
    norm = _norm_factory(bn_eps_on_std, bn_eps)
    sizes = [in_features, *hidden]
    self.dense = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.norm = nnx.List([norm(b, rngs) for b in hidden])
    self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)
    self.head_norm = _head_norm(norm, num_classes, head_norm, rngs)

  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    for dense, norm in zip(self.dense, self.norm):
      x = jax.nn.relu(norm(dense(x), use_running_average=not train))
    return _apply_head_norm(self, self.head(x), not train)


def _max_pool(x):
  return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))


class LeNet5(nnx.Module):
  """32C5-MP2-64C5-MP2-512FC-10 with batch norm ('valid' convolutions)."""

  channels = (32, 64)
  kernel = 5
  fc_width = 512

  def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
               *, head_norm: bool = True, bn_eps_on_std: bool = False,
               bn_eps: float | None = None, rngs: nnx.Rngs):
    norm = _norm_factory(bn_eps_on_std, bn_eps)
    c1, c2 = self.channels
    k = self.kernel
    self.conv1 = nnx.Conv(in_channels, c1, (k, k), padding="VALID", rngs=rngs)
    self.norm1 = norm(c1, rngs)
    self.conv2 = nnx.Conv(c1, c2, (k, k), padding="VALID", rngs=rngs)
    self.norm2 = norm(c2, rngs)
    side = ((image_size - (k - 1)) // 2 - (k - 1)) // 2
    self.fc = nnx.Linear(c2 * side * side, self.fc_width, rngs=rngs)
    self.norm3 = norm(self.fc_width, rngs)
    self.head = nnx.Linear(self.fc_width, num_classes, rngs=rngs)
    self.head_norm = _head_norm(norm, num_classes, head_norm, rngs)

  def __call__(self, x, train: bool = False):
    ura = not train
    x = _max_pool(jax.nn.relu(self.norm1(self.conv1(x), use_running_average=ura)))
    x = _max_pool(jax.nn.relu(self.norm2(self.conv2(x), use_running_average=ura)))
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(self.norm3(self.fc(x), use_running_average=ura))
    return _apply_head_norm(self, self.head(x), ura)


class LeNet5Paper(LeNet5):
  """The BLAQ appendix's LeNet5: 20C3-MP2-50C3-MP2-500FC-10 ('valid' 3x3 convolutions)."""

  channels = (20, 50)
  kernel = 3
  fc_width = 500


class VGGSmall(nnx.Module):
  """2x128C3-MP2-2x256C3-MP2-2x512C3-MP2-2x1024FC-10 with batch norm.

  ``width`` scales every layer (1.0 is the paper's model).
  """

  def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
               width: float = 1.0, *, head_norm: bool = True, bn_eps_on_std: bool = False,
               bn_eps: float | None = None, rngs: nnx.Rngs):
    norm = _norm_factory(bn_eps_on_std, bn_eps)
    chans = [int(c * width) for c in (128, 128, 256, 256, 512, 512)]
    fcs = [int(1024 * width)] * 2
    ins = [in_channels, *chans[:-1]]
    self.convs = nnx.List([nnx.Conv(a, b, (3, 3), padding="SAME", rngs=rngs)
                           for a, b in zip(ins, chans)])
    self.conv_norms = nnx.List([norm(b, rngs) for b in chans])
    side = image_size // 8
    sizes = [chans[-1] * side * side, *fcs]
    self.fcs = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.fc_norms = nnx.List([norm(b, rngs) for b in fcs])
    self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)
    self.head_norm = _head_norm(norm, num_classes, head_norm, rngs)

  def __call__(self, x, train: bool = False):
    ura = not train
    for i, (conv, norm) in enumerate(zip(self.convs, self.conv_norms)):
      x = jax.nn.relu(norm(conv(x), use_running_average=ura))
      if i % 2 == 1:
        x = _max_pool(x)
    x = x.reshape(x.shape[0], -1)
    for fc, norm in zip(self.fcs, self.fc_norms):
      x = jax.nn.relu(norm(fc(x), use_running_average=ura))
    return _apply_head_norm(self, self.head(x), ura)


MODELS = {"mlp": MLP, "lenet5": LeNet5, "lenet5_paper": LeNet5Paper, "vgg_small": VGGSmall}


def create_model(name: str, *, seed: int, **kwargs) -> nnx.Module:
  """Builds model ``name`` (a key of :data:`MODELS`) with ``kwargs``."""
  if name not in MODELS:
    raise ValueError(f"create_model: unknown model {name!r}; expected one of {sorted(MODELS)}")
  return MODELS[name](**kwargs, rngs=nnx.Rngs(seed))


def count_params(model: nnx.Module) -> int:
  return sum(int(jnp.size(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
