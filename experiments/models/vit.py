"""Vision Transformers (ViT, DeiT) in Flax linen, laid out like timm's VisionTransformer.

Parameter names follow timm's state-dict keys, with "." before a block index replaced by "_"
(timm `blocks.3.mlp.fc1.weight` is params["blocks_3"]["mlp"]["fc1"]["kernel"]), except inside
attention: Flax's MultiHeadDotProductAttention keeps query, key, value and output as separate
DenseGeneral kernels, where timm fuses `attn.qkv` and calls the output `attn.proj`
(experiments.timm_import converts between the two). Images are NHWC.
"""

import functools

import flax.linen as nn
import jax.numpy as jnp

# timm builds every ViT/DeiT LayerNorm with eps 1e-6 (Flax's default is also 1e-6; spelled out
# because Swin uses torch's 1e-5).
LayerNorm = functools.partial(nn.LayerNorm, epsilon=1e-6)
# Token and position embeddings start small, as in timm and big_vision.
embedding_init = nn.initializers.normal(stddev=0.02)


def check_image_size(images, image_size: int) -> None:
  """Raises ValueError unless ``images`` are ``(batch, image_size, image_size, ...)``:
  position embeddings and windows are laid out for one size."""
  if images.shape[1:3] != (image_size, image_size):
    raise ValueError(f"Expected {image_size}x{image_size} images, got shape {images.shape}.")


class PatchEmbed(nn.Module):
  """Cuts images into non-overlapping patches and projects each one (timm `patch_embed`).

  Attributes:
    patch_size: side of a square patch, in pixels (the conv's kernel and stride).
    width: features per token.
  """
  patch_size: int
  width: int

  @nn.compact
  def __call__(self, images):
    """Returns (batch, patches, width) tokens, patches in row-major order like timm's flatten.

    Args:
      images: (batch, height, width, channels).
    """
    patch = (self.patch_size, self.patch_size)
    x = nn.Conv(self.width, patch, strides=patch, padding="VALID", name="proj")(images)
    return x.reshape(x.shape[0], -1, x.shape[-1])


class Mlp(nn.Module):
  """timm `Mlp`: Dense `fc1` -> exact GELU -> Dense `fc2` back to the input width.

  Attributes:
    hidden_features: width of `fc1`.
  """
  hidden_features: int

  @nn.compact
  def __call__(self, x):
    """Returns the MLP of `x` (..., features), same shape as `x`."""
    y = nn.Dense(self.hidden_features, name="fc1")(x)
    y = nn.gelu(y, approximate=False)  # torch nn.GELU, timm's default, is the erf form
    return nn.Dense(x.shape[-1], name="fc2")(y)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

  Attributes:
    num_heads: attention heads; the width must be divisible by it.
    mlp_ratio: MLP hidden width as a multiple of the token width.
  """
  num_heads: int
  mlp_ratio: float

  @nn.compact
  def __call__(self, x):
    """Returns the block applied to tokens `x` (batch, tokens, width)."""
    y = LayerNorm(name="norm1")(x)
    x = x + nn.MultiHeadDotProductAttention(self.num_heads, name="attn")(y)
    y = LayerNorm(name="norm2")(x)
    return x + Mlp(int(x.shape[-1] * self.mlp_ratio), name="mlp")(y)


class VisionTransformer(nn.Module):
  """ViT with a class token and, for distilled DeiT, a distillation token.

  Tokens are [class, (distillation,) patches...] plus a learned position embedding; the head
  reads the class token after the final LayerNorm. A distilled model has a second head on the
  distillation token, and the logits are the mean of both heads, as timm returns them outside
  distillation training (separate heads for a distillation loss are not exposed here).

  Attributes:
    num_classes: outputs of the head(s).
    image_size: side of the square input image; fixes the number of position embeddings.
    patch_size: side of a square patch.
    width: features per token.
    depth: number of encoder blocks.
    num_heads: attention heads per block.
    mlp_ratio: MLP hidden width as a multiple of `width`.
    distilled: adds DeiT's distillation token and `head_dist`.
  """
  num_classes: int = 1000
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  distilled: bool = False

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
    tokens = PatchEmbed(self.patch_size, self.width, name="patch_embed")(images)
    batch = tokens.shape[0]
    prefix_names = ("cls_token", "dist_token") if self.distilled else ("cls_token",)
    prefix = [jnp.broadcast_to(self.param(name, embedding_init, (1, 1, self.width)),
                               (batch, 1, self.width)) for name in prefix_names]
    x = jnp.concatenate(prefix + [tokens], axis=1)
    x = x + self.param("pos_embed", embedding_init, (1, x.shape[1], self.width))
    for index in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_ratio, name=f"blocks_{index}")(x)
    x = LayerNorm(name="norm")(x)
    logits = nn.Dense(self.num_classes, name="head")(x[:, 0])
    if self.distilled:
      logits = (logits + nn.Dense(self.num_classes, name="head_dist")(x[:, 1])) / 2
    return logits


# timm vit_base_patch16_224 / vit_small_patch16_224.
ViTB16 = functools.partial(VisionTransformer, width=768, depth=12, num_heads=12)
ViTS16 = functools.partial(VisionTransformer, width=384, depth=12, num_heads=6)
# timm deit_{tiny,small,base}_patch16_224: DeiT-S and DeiT-B share ViT-S/B's architecture
# (the papers differ in training, not in parameters).
DeiTTiny = functools.partial(VisionTransformer, width=192, depth=12, num_heads=3)
DeiTSmall = functools.partial(VisionTransformer, width=384, depth=12, num_heads=6)
DeiTBase = functools.partial(VisionTransformer, width=768, depth=12, num_heads=12)
# timm deit_small_distilled_patch16_224.
DeiTSmallDistilled = functools.partial(VisionTransformer, width=384, depth=12, num_heads=6,
                                       distilled=True)
# 8x8 grayscale digits: 16 patches of 2x2 pixels, ~0.14M parameters.
ViTDigits = functools.partial(VisionTransformer, num_classes=10, image_size=8, patch_size=2,
                              width=64, depth=4, num_heads=4, mlp_ratio=2.0)
