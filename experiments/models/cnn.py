"""CNNs: torchvision-compatible ResNet-18/50 and a small CNN for 8x8 digits.

Parameter names follow torchvision one to one, with "." before a block or module index
replaced by "_": torchvision `layer2.0.downsample.1.running_mean` is
`batch_stats["layer2_0"]["downsample_1"]["mean"]` here (see experiments.torchvision_import).
Every model takes `train` (BatchNorm batch statistics vs running averages) and returns logits.
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", relu).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch BatchNorm2d: eps 1e-5, running stats updated with weight 0.1.
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


def conv(features, kernel_size, stride, name):
  """A bias-free convolution padded like torchvision's (padding = kernel_size // 2)."""
  pad = kernel_size // 2
  return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=conv_init, name=name)


class BasicBlock(nn.Module):
  """torchvision BasicBlock: two 3x3 convs (expansion 1)."""
  features: int
  stride: int
  expansion = 1

  @nn.compact
  def __call__(self, x, *, train):
    out_features = self.features * self.expansion
    y = conv(self.features, 3, self.stride, "conv1")(x)
    y = nn.relu(BatchNorm(use_running_average=not train, name="bn1")(y))
    y = conv(self.features, 3, 1, "conv2")(y)
    y = BatchNorm(use_running_average=not train, name="bn2")(y)
    return nn.relu(y + shortcut(x, out_features, self.stride, train))


class Bottleneck(nn.Module):
  """torchvision Bottleneck (v1.5: the stride sits on the 3x3 conv), expansion 4."""
  features: int
  stride: int
  expansion = 4

  @nn.compact
  def __call__(self, x, *, train):
    out_features = self.features * self.expansion
    y = conv(self.features, 1, 1, "conv1")(x)
    y = nn.relu(BatchNorm(use_running_average=not train, name="bn1")(y))
    y = conv(self.features, 3, self.stride, "conv2")(y)
    y = nn.relu(BatchNorm(use_running_average=not train, name="bn2")(y))
    y = conv(out_features, 1, 1, "conv3")(y)
    y = BatchNorm(use_running_average=not train, name="bn3")(y)
    return nn.relu(y + shortcut(x, out_features, self.stride, train))


def shortcut(x, out_features, stride, train):
  """Identity, or torchvision's `downsample` (1x1 conv + BN) when the shape changes.

  Called inside a block's compact `__call__`, so the modules are named in that block.
  """
  if stride == 1 and x.shape[-1] == out_features:
    return x
  x = conv(out_features, 1, stride, "downsample_0")(x)
  return BatchNorm(use_running_average=not train, name="downsample_1")(x)


class ResNet(nn.Module):
  """torchvision ResNet: 7x7 stem, max-pool, four stages `layer1..4`, global pool, `fc`."""
  stage_sizes: Sequence[int]
  block: type
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x, *, train):
    x = conv(64, 7, 2, "conv1")(x)
    x = nn.relu(BatchNorm(use_running_average=not train, name="bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for index in range(num_blocks):
        stride = 2 if stage > 0 and index == 0 else 1
        x = self.block(64 * 2**stage, stride, name=f"layer{stage + 1}_{index}")(
            x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck)


class SmallCNN(nn.Module):
  """Three 3x3 conv+BN+ReLU layers and a dense head, sized for 8x8 grayscale digits.

  ~23k parameters: trains to ~97-98% test accuracy on sklearn digits in seconds on a CPU.
  """
  num_classes: int = 10
  features: Sequence[int] = (16, 32, 64)

  @nn.compact
  def __call__(self, x, *, train):
    for index, features in enumerate(self.features):
      x = conv(features, 3, 1, f"conv{index + 1}")(x)
      x = nn.relu(BatchNorm(use_running_average=not train, name=f"bn{index + 1}")(x))
      if index == 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))  # 8x8 -> 4x4
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)

