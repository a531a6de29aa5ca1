"""Swin Transformer in Flax linen, laid out like timm >= 0.9's SwinTransformer.

Checked against timm 1.0.29.dev0 (huggingface/pytorch-image-models, August 2026,
timm/models/swin_transformer.py), whose layout dates from timm 0.9.0: patch merging is the
first module of stages 1..3 (`layers.1.downsample.reduction.weight`; timm < 0.9 and Microsoft's
original code attach it to the end of stages 0..2 as `layers.0.downsample`), the classifier is
`head.fc`, and feature maps stay (batch, height, width, channels) between stages. Parameter
names follow timm's keys with "." before an index replaced by "_"; attention keeps query, key,
value and output as separate DenseGeneral kernels, like Flax's MultiHeadDotProductAttention,
where timm fuses `attn.qkv` and names the output `attn.proj` (see experiments.timm_import).
Images are NHWC with a square size that each stage's window size divides.
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from experiments.models.vit import Mlp
from experiments.models.vit import check_image_size

# timm's Swin uses torch nn.LayerNorm, whose eps is 1e-5 (ViT uses 1e-6).
LayerNorm = functools.partial(nn.LayerNorm, epsilon=1e-5)
# Added to the attention logits of token pairs that the cyclic shift put in one window but that
# are not neighbours in the image. timm's value: finite, so no row of the softmax is all -inf.
MASKED_LOGIT = -100.0


def relative_position_index(window):
  """timm's `relative_position_index` buffer for a square window.

  Args:
    window: side of the window, in tokens.
  Returns:
    (window**2, window**2) int array; entry [i, j] is the row of the bias table for the offset
    (dy, dx) of token i from token j (row-major tokens), stored as
    (dy + window - 1) * (2 * window - 1) + (dx + window - 1).
  """
  rows, cols = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
  coords = np.stack([rows.ravel(), cols.ravel()])
  offsets = coords[:, :, None] - coords[:, None, :] + window - 1
  return offsets[0] * (2 * window - 1) + offsets[1]


def window_and_shift(resolution, window):
  """Window size and shift of a shifted block on a `resolution`-sided map, clamped like timm.

  A map no larger than the window is attended as one window, and shifting it would only wrap
  tokens around, so timm then uses window = resolution and no shift.

  Returns:
    (window, shift) for the shifted blocks; unshifted blocks use the same window.
  """
  if resolution <= window:
    return resolution, 0
  return window, window // 2


def partition_windows(x, window):
  """(batch, height, width, channels) -> (batch * windows, window**2, channels).

  Windows are ordered batch-major, then row-major over the map; tokens row-major in a window.
  Works on numpy and jax arrays.
  """
  batch, height, width, channels = x.shape
  x = x.reshape(batch, height // window, window, width // window, window, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def merge_windows(windows, window, height, width):
  """Inverse of partition_windows: (batch * windows, window**2, C) -> (batch, height, width, C)."""
  channels = windows.shape[-1]
  x = windows.reshape(-1, height // window, width // window, window, window, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def shifted_window_mask(size, window, shift):
  """Additive attention mask of the shifted blocks on a size x size map (timm `attn_mask`).

  Rolling the map by -shift brings the last `shift` rows and columns of the image next to the
  first ones; each window may attend only within one of the 3 x 3 regions the roll creates.

  Returns:
    (windows, window**2, window**2) float32: 0 within a region, MASKED_LOGIT across regions.
  """
  region = np.zeros((size, size), np.int32)
  bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  for row, rows in enumerate(bands):
    for col, cols in enumerate(bands):
      region[rows, cols] = 3 * row + col
  labels = partition_windows(region[None, :, :, None], window)[..., 0]
  return np.where(labels[:, :, None] != labels[:, None, :], MASKED_LOGIT, 0.0).astype(np.float32)


class WindowAttention(nn.Module):
  """Multi-head self-attention within windows, plus timm's relative position bias.

  Attributes:
    num_heads: attention heads; the width must be divisible by it.
    window: side of the (square) window, in tokens.
  """
  num_heads: int
  window: int

  @nn.compact
  def __call__(self, windows, mask=None):
    """Returns attended windows, same shape as `windows`.

    Args:
      windows: (batch * num_windows, window**2, width) tokens.
      mask: None, or an additive (num_windows, window**2, window**2) mask.
    """
    width = windows.shape[-1]
    head_dim = width // self.num_heads
    projection = functools.partial(nn.DenseGeneral, (self.num_heads, head_dim))
    query = projection(name="query")(windows) * head_dim**-0.5
    key = projection(name="key")(windows)
    value = projection(name="value")(windows)
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key)
    table = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                       ((2 * self.window - 1) ** 2, self.num_heads))
    logits = logits + table[relative_position_index(self.window)].transpose(2, 0, 1)[None]
    if mask is not None:
      num_windows = mask.shape[0]
      logits = logits.reshape(-1, num_windows, *logits.shape[1:]) + mask[None, :, None]
      logits = logits.reshape(-1, *logits.shape[2:])
    weights = nn.softmax(logits, axis=-1)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    return nn.DenseGeneral(width, axis=(-2, -1), name="out")(attended)


class SwinBlock(nn.Module):
  """Swin block: x + window_attention(norm1(x)), then x + mlp(norm2(x)).

  Attributes:
    num_heads: attention heads.
    window: window side, already clamped to the map (window_and_shift).
    shift: cyclic shift of the windows (0 for regular windows).
    mlp_ratio: MLP hidden width as a multiple of the channels.
  """
  num_heads: int
  window: int
  shift: int
  mlp_ratio: float

  @nn.compact
  def __call__(self, x):
    """Returns the block applied to `x` (batch, size, size, channels)."""
    _, size, _, channels = x.shape
    if size % self.window:
      raise ValueError(f"A {size}x{size} feature map does not split into {self.window}x"
                       f"{self.window} windows (timm pads it; this model does not).")
    y = LayerNorm(name="norm1")(x)
    mask = None
    if self.shift:
      y = jnp.roll(y, (-self.shift, -self.shift), axis=(1, 2))
      mask = shifted_window_mask(size, self.window, self.shift)
    y = WindowAttention(self.num_heads, self.window, name="attn")(
        partition_windows(y, self.window), mask)
    y = merge_windows(y, self.window, size, size)
    if self.shift:
      y = jnp.roll(y, (self.shift, self.shift), axis=(1, 2))
    x = x + y
    return x + Mlp(int(channels * self.mlp_ratio), name="mlp")(LayerNorm(name="norm2")(x))


class PatchMerging(nn.Module):
  """Halves the resolution: each 2x2 neighbourhood concatenated (4C) -> LayerNorm -> Dense.

  Attributes:
    out_features: output channels (2C in Swin).
  """
  out_features: int

  @nn.compact
  def __call__(self, x):
    """Returns (batch, height / 2, width / 2, out_features) from (batch, height, width, C)."""
    batch, height, width, channels = x.shape
    if height % 2 or width % 2:
      raise ValueError(f"Patch merging needs an even feature map, got {height}x{width}.")
    # timm's concatenation order is (row, col) offsets (0,0), (1,0), (0,1), (1,1): row fastest.
    x = x.reshape(batch, height // 2, 2, width // 2, 2, channels).transpose(0, 1, 3, 4, 2, 5)
    x = x.reshape(batch, height // 2, width // 2, 4 * channels)
    x = LayerNorm(name="norm")(x)
    return nn.Dense(self.out_features, use_bias=False, name="reduction")(x)


class SwinStage(nn.Module):
  """timm SwinTransformerStage: optional patch merging (`downsample`), then `depth` blocks.

  Blocks alternate regular and shifted windows, starting with regular ones.

  Attributes:
    depth: number of blocks.
    num_heads: attention heads per block.
    window: window side before clamping to the map.
    mlp_ratio: MLP hidden width as a multiple of the channels.
    downsample: whether the stage starts by merging patches (stages 1..3 of Swin).
  """
  depth: int
  num_heads: int
  window: int
  mlp_ratio: float
  downsample: bool

  @nn.compact
  def __call__(self, x):
    """Returns the stage applied to `x` (batch, size, size, channels)."""
    if self.downsample:
      x = PatchMerging(2 * x.shape[-1], name="downsample")(x)
    window, shift = window_and_shift(x.shape[1], self.window)
    for index in range(self.depth):
      x = SwinBlock(self.num_heads, window, shift if index % 2 else 0, self.mlp_ratio,
                    name=f"blocks_{index}")(x)
    return x


class PatchEmbed(nn.Module):
  """Swin's patch embedding: strided conv `proj`, then LayerNorm `norm`; stays NHWC.

  Attributes:
    patch_size: side of a square patch (the conv's kernel and stride).
    width: output channels.
  """
  patch_size: int
  width: int

  @nn.compact
  def __call__(self, images):
    """Returns (batch, height / patch, width / patch, width) from NHWC images."""
    patch = (self.patch_size, self.patch_size)
    x = nn.Conv(self.width, patch, strides=patch, padding="VALID", name="proj")(images)
    return LayerNorm(name="norm")(x)


class ClassifierHead(nn.Module):
  """timm ClassifierHead with average pooling: mean over positions, then Dense `fc`.

  Attributes:
    num_classes: outputs of `fc`.
  """
  num_classes: int

  @nn.compact
  def __call__(self, x):
    """Returns logits (batch, num_classes) from features (batch, height, width, channels)."""
    return nn.Dense(self.num_classes, name="fc")(jnp.mean(x, axis=(1, 2)))


class SwinTransformer(nn.Module):
  """Swin Transformer: patch embedding, stages `layers_0..`, final LayerNorm, pooled head.

  Attributes:
    num_classes: outputs of the head.
    image_size: side of the square input image.
    patch_size: side of a patch of the embedding.
    embed_dim: channels of stage 0; each later stage doubles them.
    depths: blocks per stage.
    num_heads: attention heads per stage.
    window_size: window side, clamped per stage to the feature map.
    mlp_ratio: MLP hidden width as a multiple of the channels.
  """
  num_classes: int = 1000
  image_size: int = 224
  patch_size: int = 4
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0

  @nn.compact
  def __call__(self, images, *, train):
    """Returns logits (batch, num_classes).

    Args:
      images: (batch, image_size, image_size, channels).
      train: unused: there is no dropout or BatchNorm, so training and evaluation compute the
        same function; kept for the interface every model shares.
    """
    del train
    check_image_size(images, self.image_size)
    x = PatchEmbed(self.patch_size, self.embed_dim, name="patch_embed")(images)
    for index, (depth, num_heads) in enumerate(zip(self.depths, self.num_heads, strict=True)):
      x = SwinStage(depth, num_heads, self.window_size, self.mlp_ratio, downsample=index > 0,
                    name=f"layers_{index}")(x)
    x = LayerNorm(name="norm")(x)
    return ClassifierHead(self.num_classes, name="head")(x)


# timm swin_tiny_patch4_window7_224. At 224 the stages see 56, 28, 14 and 7 tokens a side, so
# the last stage is a single unshifted 7x7 window.
SwinTiny = functools.partial(SwinTransformer, patch_size=4, embed_dim=96, depths=(2, 2, 6, 2),
                             num_heads=(3, 6, 12, 24), window_size=7)
