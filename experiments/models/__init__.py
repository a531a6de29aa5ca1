"""Flax models for the experiments, picked by name through MODELS / create_model.

cnn: torchvision-compatible ResNet-18/50 and SmallCNN (experiments.torchvision_import).
vit: ViT and DeiT, swin: Swin-T, laid out like timm (experiments.timm_import), plus ViTDigits.
Every model is built as `MODELS[name](num_classes=...)`, takes NHWC images and is called as
`model.apply(variables, images, train=...)`, returning logits. `create_model` also accepts the
lower-case timm-style ALIASES (`deit_small`, `swin_tiny`, ...) and the full timm names of
TIMM_NAMES (`deit_small_patch16_224`).
"""

import dataclasses

from experiments.models.cnn import BasicBlock
from experiments.models.cnn import BatchNorm
from experiments.models.cnn import Bottleneck
from experiments.models.cnn import ResNet
from experiments.models.cnn import ResNet18
from experiments.models.cnn import ResNet50
from experiments.models.cnn import SmallCNN
from experiments.models.cnn import conv
from experiments.models.cnn import conv_init
from experiments.models.cnn import shortcut
from experiments.models.swin import SwinTiny
from experiments.models.swin import SwinTransformer
from experiments.models.vit import DeiTBase
from experiments.models.vit import DeiTSmall
from experiments.models.vit import DeiTSmallDistilled
from experiments.models.vit import DeiTTiny
from experiments.models.vit import ViTB16
from experiments.models.vit import ViTDigits
from experiments.models.vit import ViTS16
from experiments.models.vit import VisionTransformer

__all__ = [
    "ALIASES",
    "BasicBlock",
    "BatchNorm",
    "Bottleneck",
    "DeiTBase",
    "DeiTSmall",
    "DeiTSmallDistilled",
    "DeiTTiny",
    "MODELS",
    "ResNet",
    "ResNet18",
    "ResNet50",
    "SmallCNN",
    "SwinTiny",
    "SwinTransformer",
    "TIMM_NAMES",
    "ViTB16",
    "ViTDigits",
    "ViTS16",
    "VisionTransformer",
    "conv",
    "conv_init",
    "canonical_name",
    "create_model",
    "shortcut",
]

MODELS = {
    "ResNet18": ResNet18,
    "ResNet50": ResNet50,
    "SmallCNN": SmallCNN,
    "ViTB16": ViTB16,
    "ViTS16": ViTS16,
    "DeiTTiny": DeiTTiny,
    "DeiTSmall": DeiTSmall,
    "DeiTBase": DeiTBase,
    "DeiTSmallDistilled": DeiTSmallDistilled,
    "SwinTiny": SwinTiny,
    "ViTDigits": ViTDigits,
}

# timm model name -> key of MODELS with the same architecture and parameter layout.
TIMM_NAMES = {
    "vit_base_patch16_224": "ViTB16",
    "vit_small_patch16_224": "ViTS16",
    "deit_tiny_patch16_224": "DeiTTiny",
    "deit_small_patch16_224": "DeiTSmall",
    "deit_base_patch16_224": "DeiTBase",
    "deit_small_distilled_patch16_224": "DeiTSmallDistilled",
    "swin_tiny_patch4_window7_224": "SwinTiny",
}


# Short lower-case names, as timm's without the patch and resolution suffix (the command line's
# --config.model.name=deit_small) -> key of MODELS.
ALIASES = {
    "vit_base": "ViTB16",
    "vit_small": "ViTS16",
    "deit_tiny": "DeiTTiny",
    "deit_small": "DeiTSmall",
    "deit_base": "DeiTBase",
    "deit_small_distilled": "DeiTSmallDistilled",
    "swin_tiny": "SwinTiny",
}


def canonical_name(name):
  """The key of MODELS that `name` (a key, an ALIASES or a TIMM_NAMES entry) stands for."""
  canonical = ALIASES.get(name) or TIMM_NAMES.get(name) or name
  if canonical not in MODELS:
    raise ValueError(f"Unknown model {name!r}; expected one of {sorted(MODELS)} or an alias "
                     f"{sorted(ALIASES)} or a timm name {sorted(TIMM_NAMES)}.")
  return canonical


def create_model(name, num_classes, image_size=None, **attributes):
  """Builds the model called `name`.

  Args:
    name: a key of MODELS, ALIASES or TIMM_NAMES.
    num_classes: outputs of the model's classifier.
    image_size: side of the input images, for the models that fix it (the transformers: it sets
      ViT's number of position embeddings and the feature-map size of each Swin stage); ignored
      by the CNNs, which pool globally and take any size. None keeps the model's default.
    **attributes: other module attributes to override (e.g. Swin's `window_size`); None keeps
      the default. An attribute the model does not have is an error.
  Returns:
    The flax module (not initialised).
  """
  constructor = MODELS[canonical_name(name)]
  fields = {field.name for field in dataclasses.fields(getattr(constructor, "func", constructor))}
  attributes = {key: value for key, value in attributes.items() if value is not None}
  unknown = sorted(set(attributes) - fields)
  if unknown:
    raise ValueError(f"Model {name!r} has no attribute(s) {unknown}.")
  if image_size is not None and "image_size" in fields:
    attributes["image_size"] = image_size
  return constructor(num_classes=num_classes, **attributes)
