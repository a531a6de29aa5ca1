"""timm state dicts (keys and shapes written here from timm's naming rules, random values) import
exactly, and the imported models compute what timm's modules compute."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from safetensors import numpy as safetensors_numpy

from experiments import models
from experiments import timm_import

# Parameter counts with 1000 classes. ViT-B/16 and Swin-T: the exact integers torchvision
# publishes for the same architectures (pytorch.org/vision/stable/models: ViT_B_16_Weights and
# Swin_T_Weights, num_params 86567656 and 28288354). timm publishes counts in millions to two
# decimals (results/results-imagenet.csv, param_count, huggingface/pytorch-image-models at
# aa4b5850, August 2026; the Hugging Face model cards round them to one decimal): the integers
# for the other models are the sums of their timm tensor shapes, checked against those.
PUBLISHED_COUNTS = {
    "vit_base_patch16_224": (86_567_656, 86.57),
    "vit_small_patch16_224": (22_050_664, 22.05),
    "deit_tiny_patch16_224": (5_717_416, 5.72),
    "deit_small_patch16_224": (22_050_664, 22.05),
    "deit_base_patch16_224": (86_567_656, 86.57),
    "deit_small_distilled_patch16_224": (22_436_432, 22.44),
    "swin_tiny_patch4_window7_224": (28_288_354, 28.29),
}
# Architectures from timm's model constructors (vision_transformer.py, deit.py,
# swin_transformer.py): width, depth, heads, distilled; heads do not change ViT key shapes.
VIT_ARCHITECTURES = {
    "vit_base_patch16_224": dict(width=768, depth=12, distilled=False),
    "vit_small_patch16_224": dict(width=384, depth=12, distilled=False),
    "deit_tiny_patch16_224": dict(width=192, depth=12, distilled=False),
    "deit_small_patch16_224": dict(width=384, depth=12, distilled=False),
    "deit_base_patch16_224": dict(width=768, depth=12, distilled=False),
    "deit_small_distilled_patch16_224": dict(width=384, depth=12, distilled=True),
}
# Small enough to run: the forward pass of the others is only traced (jax.eval_shape).
RUN_FORWARD = ("deit_tiny_patch16_224",)
# Tiny configurations compared with a numpy transcription of timm's forward pass. The Swin one
# has 24, 12, 6 and 3 tokens a side with window 6: two shifted stages, one single window, one
# window clamped to 3.
TINY_VIT = dict(image_size=16, patch_size=4, width=16, depth=2, num_heads=2, mlp_ratio=4.0,
                distilled=True)
TINY_SWIN = dict(image_size=48, patch_size=2, embed_dim=8, depths=(2, 2, 2, 2),
                 num_heads=(1, 2, 2, 4), window_size=6, mlp_ratio=4.0)


def vit_shapes(width, depth, distilled, num_classes=1000, image_size=224, patch_size=16,
               channels=3, mlp_ratio=4.0):
  """timm VisionTransformer / VisionTransformerDistilled state-dict shapes."""
  num_tokens = (image_size // patch_size) ** 2 + (2 if distilled else 1)
  hidden = int(width * mlp_ratio)
  shapes = {
      "cls_token": (1, 1, width),
      "pos_embed": (1, num_tokens, width),
      "patch_embed.proj.weight": (width, channels, patch_size, patch_size),
      "patch_embed.proj.bias": (width,),
  }
  if distilled:
    shapes["dist_token"] = (1, 1, width)
  for index in range(depth):
    block = f"blocks.{index}"
    shapes.update({
        f"{block}.norm1.weight": (width,), f"{block}.norm1.bias": (width,),
        f"{block}.attn.qkv.weight": (3 * width, width), f"{block}.attn.qkv.bias": (3 * width,),
        f"{block}.attn.proj.weight": (width, width), f"{block}.attn.proj.bias": (width,),
        f"{block}.norm2.weight": (width,), f"{block}.norm2.bias": (width,),
        f"{block}.mlp.fc1.weight": (hidden, width), f"{block}.mlp.fc1.bias": (hidden,),
        f"{block}.mlp.fc2.weight": (width, hidden), f"{block}.mlp.fc2.bias": (width,),
    })
  shapes.update({"norm.weight": (width,), "norm.bias": (width,),
                 "head.weight": (num_classes, width), "head.bias": (num_classes,)})
  if distilled:
    shapes.update({"head_dist.weight": (num_classes, width), "head_dist.bias": (num_classes,)})
  return shapes


def swin_shapes(num_classes=1000, image_size=224, patch_size=4, embed_dim=96,
                depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0,
                channels=3):
  """timm (>= 0.9) SwinTransformer state-dict shapes, parameters only (buffers are not saved)."""
  dim = embed_dim
  shapes = {"patch_embed.proj.weight": (dim, channels, patch_size, patch_size),
            "patch_embed.proj.bias": (dim,),
            "patch_embed.norm.weight": (dim,), "patch_embed.norm.bias": (dim,)}
  resolution = image_size // patch_size
  for stage, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
    if stage > 0:
      shapes.update({f"layers.{stage}.downsample.norm.weight": (4 * dim,),
                     f"layers.{stage}.downsample.norm.bias": (4 * dim,),
                     f"layers.{stage}.downsample.reduction.weight": (2 * dim, 4 * dim)})
      dim, resolution = 2 * dim, resolution // 2
    window = min(window_size, resolution)
    hidden = int(dim * mlp_ratio)
    for index in range(depth):
      block = f"layers.{stage}.blocks.{index}"
      shapes.update({
          f"{block}.norm1.weight": (dim,), f"{block}.norm1.bias": (dim,),
          f"{block}.attn.relative_position_bias_table": ((2 * window - 1) ** 2, heads),
          f"{block}.attn.qkv.weight": (3 * dim, dim), f"{block}.attn.qkv.bias": (3 * dim,),
          f"{block}.attn.proj.weight": (dim, dim), f"{block}.attn.proj.bias": (dim,),
          f"{block}.norm2.weight": (dim,), f"{block}.norm2.bias": (dim,),
          f"{block}.mlp.fc1.weight": (hidden, dim), f"{block}.mlp.fc1.bias": (hidden,),
          f"{block}.mlp.fc2.weight": (dim, hidden), f"{block}.mlp.fc2.bias": (dim,),
      })
  shapes.update({"norm.weight": (dim,), "norm.bias": (dim,),
                 "head.fc.weight": (num_classes, dim), "head.fc.bias": (num_classes,)})
  return shapes


def timm_shapes(name):
  if name.startswith("swin"):
    return swin_shapes()
  return vit_shapes(**VIT_ARCHITECTURES[name])


def random_state_dict(shapes, seed, scale=0.02):
  rng = np.random.default_rng(seed)
  return {key: scale * rng.standard_normal(shape, dtype=np.float32)
          for key, shape in shapes.items()}


def template(model, image_size, channels=3):
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, channels)), train=False))


@pytest.fixture(scope="module")
def imported():
  """Returns name -> (model, template, state dict, imported variables), each built once."""
  cache = {}

  def get(name):
    if name not in cache:
      model = models.create_model(models.TIMM_NAMES[name], 1000)
      variables_template = template(model, 224)
      state_dict = random_state_dict(timm_shapes(name), seed=0)
      cache[name] = (model, variables_template, state_dict,
                     timm_import.import_timm(state_dict, variables_template))
    return cache[name]

  yield get
  cache.clear()  # ~3 GB of random weights for the seven models


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_import_fills_every_parameter_with_the_published_count(imported, name):
  model, variables_template, state_dict, variables = imported(name)
  exact, millions = PUBLISHED_COUNTS[name]
  count = sum(leaf.size for leaf in jax.tree.leaves(variables))
  assert count == exact and round(count / 1e6, 2) == millions
  assert count == sum(value.size for value in state_dict.values())
  assert jax.tree.structure(variables) == jax.tree.structure(variables_template)
  assert jax.tree.all(jax.tree.map(lambda a, t: a.shape == t.shape and a.dtype == t.dtype,
                                   variables, variables_template))
  images = np.random.default_rng(0).normal(size=(1, 224, 224, 3)).astype(np.float32)
  if name in RUN_FORWARD:
    logits = jax.jit(functools.partial(model.apply, train=False))(variables, images)
    assert logits.shape == (1, 1000) and np.all(np.isfinite(logits))
  else:
    logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, images)
    assert logits.shape == (1, 1000) and logits.dtype == jnp.float32


def test_qkv_rows_and_projections_land_in_their_heads(imported):
  _, _, state_dict, variables = imported("deit_small_distilled_patch16_224")
  params = variables["params"]
  attn = params["blocks_5"]["attn"]
  width, head_dim, head, dim = 384, 64, 4, 17
  qkv_weight = state_dict["blocks.5.attn.qkv.weight"]
  qkv_bias = state_dict["blocks.5.attn.qkv.bias"]
  for part, projection in enumerate(("query", "key", "value")):
    row = part * width + head * head_dim + dim  # timm: reshape(B, N, 3, heads, head_dim)
    np.testing.assert_array_equal(attn[projection]["kernel"][:, head, dim], qkv_weight[row])
    assert attn[projection]["bias"][head, dim] == qkv_bias[row]
  np.testing.assert_array_equal(attn["out"]["kernel"][head, dim],
                                state_dict["blocks.5.attn.proj.weight"][:, head * head_dim + dim])
  np.testing.assert_array_equal(attn["out"]["bias"], state_dict["blocks.5.attn.proj.bias"])
  conv = params["patch_embed"]["proj"]["kernel"]  # (H, W, I, O) from (O, I, H, W)
  assert conv[3, 11, 2, 100] == state_dict["patch_embed.proj.weight"][100, 2, 3, 11]
  np.testing.assert_array_equal(params["blocks_11"]["mlp"]["fc2"]["kernel"],
                                state_dict["blocks.11.mlp.fc2.weight"].T)
  np.testing.assert_array_equal(params["blocks_0"]["norm2"]["scale"],
                                state_dict["blocks.0.norm2.weight"])
  for token in ("cls_token", "dist_token", "pos_embed"):
    np.testing.assert_array_equal(params[token], state_dict[token])
  np.testing.assert_array_equal(params["head_dist"]["kernel"], state_dict["head_dist.weight"].T)


def test_swin_downsample_and_bias_tables_land_in_timm_09_places(imported):
  _, _, state_dict, variables = imported("swin_tiny_patch4_window7_224")
  params = variables["params"]
  assert "downsample" not in params["layers_0"]
  np.testing.assert_array_equal(params["layers_1"]["downsample"]["reduction"]["kernel"],
                                state_dict["layers.1.downsample.reduction.weight"].T)
  np.testing.assert_array_equal(
      params["layers_2"]["blocks_3"]["attn"]["relative_position_bias_table"],
      state_dict["layers.2.blocks.3.attn.relative_position_bias_table"])
  assert params["layers_3"]["blocks_1"]["attn"]["relative_position_bias_table"].shape == (169, 24)
  np.testing.assert_array_equal(params["head"]["fc"]["kernel"], state_dict["head.fc.weight"].T)


def layer_norm(x, weight, bias, eps):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * weight + bias


def linear(x, state_dict, prefix):
  out = x @ state_dict[f"{prefix}.weight"].T
  return out + state_dict[f"{prefix}.bias"] if f"{prefix}.bias" in state_dict else out


def mlp(x, state_dict, prefix):
  hidden = linear(x, state_dict, f"{prefix}.fc1")
  hidden = 0.5 * hidden * (1 + scipy.special.erf(hidden / np.sqrt(2)))  # torch nn.GELU
  return linear(hidden, state_dict, f"{prefix}.fc2")


def patchify(images_nchw, weight, bias):
  """Conv with kernel = stride = patch, as an einsum over patches: (B, rows, cols, out)."""
  batch, channels, height, width = images_nchw.shape
  patch = weight.shape[-1]
  patches = images_nchw.reshape(batch, channels, height // patch, patch, width // patch, patch)
  return np.einsum("bcypxq,ocpq->byxo", patches, weight) + bias


def softmax(logits):
  exp = np.exp(logits - logits.max(-1, keepdims=True))
  return exp / exp.sum(-1, keepdims=True)


def timm_attention(x, state_dict, prefix, num_heads, bias=None):
  """timm Attention / WindowAttention on tokens x (B, N, C); `bias` (B or 1, heads, N, N)."""
  batch, tokens, width = x.shape
  qkv = linear(x, state_dict, f"{prefix}.qkv").reshape(batch, tokens, 3, num_heads, -1)
  q, k, v = qkv.transpose(2, 0, 3, 1, 4)
  logits = q * q.shape[-1] ** -0.5 @ k.transpose(0, 1, 3, 2)
  out = softmax(logits if bias is None else logits + bias) @ v
  return linear(out.transpose(0, 2, 1, 3).reshape(batch, tokens, width), state_dict,
                f"{prefix}.proj")


def timm_vit_forward(state_dict, images_nchw, depth, num_heads):
  """numpy transcription of timm's VisionTransformerDistilled forward (inference)."""
  x = patchify(images_nchw, state_dict["patch_embed.proj.weight"],
               state_dict["patch_embed.proj.bias"])
  x = x.reshape(x.shape[0], -1, x.shape[-1])
  prefix = [np.broadcast_to(state_dict[name], (x.shape[0], 1, x.shape[-1]))
            for name in ("cls_token", "dist_token")]
  x = np.concatenate(prefix + [x], axis=1) + state_dict["pos_embed"]
  for index in range(depth):
    block = f"blocks.{index}"
    norm1 = layer_norm(x, state_dict[f"{block}.norm1.weight"], state_dict[f"{block}.norm1.bias"],
                       1e-6)
    x = x + timm_attention(norm1, state_dict, f"{block}.attn", num_heads)
    norm2 = layer_norm(x, state_dict[f"{block}.norm2.weight"], state_dict[f"{block}.norm2.bias"],
                       1e-6)
    x = x + mlp(norm2, state_dict, f"{block}.mlp")
  x = layer_norm(x, state_dict["norm.weight"], state_dict["norm.bias"], 1e-6)
  return (linear(x[:, 0], state_dict, "head") + linear(x[:, 1], state_dict, "head_dist")) / 2


def timm_window_attention(x, state_dict, prefix, num_heads, window, shift):
  """Shifted-window attention on x (B, H, W, C), one window at a time.

  After rolling by -shift, two tokens of a window may attend to each other only if, along
  each axis, both or neither wrapped around (sit in the last `shift` rows/columns); timm adds
  -100 to the other logits.
  """
  batch, size, _, channels = x.shape
  rolled = np.roll(x, (-shift, -shift), axis=(1, 2))
  out = np.empty_like(rolled)
  table = state_dict[f"{prefix}.attn.relative_position_bias_table"]
  offsets = np.arange(window)
  rows, cols = np.repeat(offsets, window), np.tile(offsets, window)
  for top in range(0, size, window):
    for left in range(0, size, window):
      wrapped_rows = top + rows >= size - shift if shift else np.zeros_like(rows, bool)
      wrapped_cols = left + cols >= size - shift if shift else np.zeros_like(cols, bool)
      allowed = ((wrapped_rows[:, None] == wrapped_rows[None])
                 & (wrapped_cols[:, None] == wrapped_cols[None]))
      index = ((rows[:, None] - rows[None] + window - 1) * (2 * window - 1)
               + cols[:, None] - cols[None] + window - 1)
      bias = table[index].transpose(2, 0, 1) + np.where(allowed, 0.0, -100.0)
      tokens = rolled[:, top:top + window, left:left + window].reshape(batch, -1, channels)
      attended = timm_attention(tokens, state_dict, f"{prefix}.attn", num_heads, bias[None])
      out[:, top:top + window, left:left + window] = attended.reshape(
          batch, window, window, channels)
  return np.roll(out, (shift, shift), axis=(1, 2))


def timm_swin_forward(state_dict, images_nchw, depths, num_heads, window_size):
  """numpy transcription of timm's SwinTransformer forward (timm >= 0.9 layout)."""
  def norm(x, prefix):
    return layer_norm(x, state_dict[f"{prefix}.weight"], state_dict[f"{prefix}.bias"], 1e-5)

  x = norm(patchify(images_nchw, state_dict["patch_embed.proj.weight"],
                    state_dict["patch_embed.proj.bias"]), "patch_embed.norm")
  for stage, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
    if stage > 0:
      x = np.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                         axis=-1)
      x = linear(norm(x, f"layers.{stage}.downsample.norm"), state_dict,
                 f"layers.{stage}.downsample.reduction")
    size = x.shape[1]
    window = min(window_size, size)
    for index in range(depth):
      block = f"layers.{stage}.blocks.{index}"
      shift = window_size // 2 if index % 2 and size > window_size else 0
      x = x + timm_window_attention(norm(x, f"{block}.norm1"), state_dict, block, heads, window,
                                    shift)
      x = x + mlp(norm(x, f"{block}.norm2"), state_dict, f"{block}.mlp")
  x = norm(x, "norm").mean(axis=(1, 2))
  return linear(x, state_dict, "head.fc")


def test_tiny_vit_matches_timm_forward():
  model = models.VisionTransformer(num_classes=5, **TINY_VIT)
  state_dict = random_state_dict(
      vit_shapes(16, 2, True, num_classes=5, image_size=16, patch_size=4), seed=1, scale=0.3)
  variables = timm_import.import_timm(state_dict, template(model, 16))
  images = np.random.default_rng(2).normal(size=(2, 16, 16, 3)).astype(np.float32)
  logits = jax.jit(functools.partial(model.apply, train=False))(variables, images)
  expected = timm_vit_forward(state_dict, images.transpose(0, 3, 1, 2), depth=2, num_heads=2)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_tiny_swin_matches_timm_forward():
  model = models.SwinTransformer(num_classes=5, **TINY_SWIN)
  state_dict = random_state_dict(swin_shapes(num_classes=5, **TINY_SWIN), seed=3, scale=0.3)
  variables = timm_import.import_timm(state_dict, template(model, 48))
  images = np.random.default_rng(4).normal(size=(2, 48, 48, 3)).astype(np.float32)
  logits = jax.jit(functools.partial(model.apply, train=False))(variables, images)
  expected = timm_swin_forward(state_dict, images.transpose(0, 3, 1, 2), TINY_SWIN["depths"],
                               TINY_SWIN["num_heads"], TINY_SWIN["window_size"])
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_swin():
  model = models.SwinTransformer(num_classes=5, **TINY_SWIN)
  state_dict = random_state_dict(swin_shapes(num_classes=5, **TINY_SWIN), seed=5)
  return template(model, 48), state_dict


def timm_relative_position_index(window):
  """timm's buffer, entry by entry: (dy + window - 1) * (2 * window - 1) + dx + window - 1."""
  index = np.empty((window * window, window * window), np.int64)
  for i in range(window * window):
    for j in range(window * window):
      dy, dx = i // window - j // window, i % window - j % window
      index[i, j] = (dy + window - 1) * (2 * window - 1) + dx + window - 1
  return index


def test_swin_buffers_are_checked_not_imported(tiny_swin):
  variables_template, state_dict = tiny_swin
  with_buffers = dict(state_dict)
  with_buffers["layers.0.blocks.0.attn.relative_position_index"] = timm_relative_position_index(6)
  with_buffers["layers.3.blocks.1.attn.relative_position_index"] = timm_relative_position_index(3)
  with_buffers["layers.0.blocks.1.attn_mask"] = np.zeros((16, 36, 36), np.float32)
  variables = timm_import.import_timm(with_buffers, variables_template)
  assert sum(leaf.size for leaf in jax.tree.leaves(variables)) == sum(
      value.size for value in state_dict.values())
  wrong_index = dict(with_buffers, **{
      "layers.1.blocks.0.attn.relative_position_index": timm_relative_position_index(6).T + 1})
  with pytest.raises(ValueError, match=r"layers\.1\.blocks\.0\.attn\.relative_position_index"):
    timm_import.import_timm(wrong_index, variables_template)
  stray_mask = dict(with_buffers, **{"layers.0.blocks.7.attn_mask": np.zeros((1,), np.float32)})
  with pytest.raises(ValueError, match=r"layers\.0\.blocks\.7\.attn_mask"):
    timm_import.import_timm(stray_mask, variables_template)


def test_missing_unexpected_and_misshaped_keys_are_named(tiny_swin):
  variables_template, state_dict = tiny_swin
  missing = dict(state_dict)
  del missing["layers.2.blocks.1.mlp.fc2.bias"]
  with pytest.raises(ValueError, match=r"Missing key 'layers\.2\.blocks\.1\.mlp\.fc2\.bias'"):
    timm_import.import_timm(missing, variables_template)
  extra = dict(state_dict, **{"layers.0.downsample.reduction.weight": np.zeros((16, 32))})
  with pytest.raises(ValueError, match=r"Unexpected key 'layers\.0\.downsample\.reduction"):
    timm_import.import_timm(extra, variables_template)
  misshaped = dict(state_dict, **{"layers.1.blocks.0.attn.qkv.weight": np.zeros((45, 16))})
  with pytest.raises(ValueError, match=r"'layers\.1\.blocks\.0\.attn\.qkv\.weight': \(45, 16\), "
                                       r"the model expects \(48, 16\)"):
    timm_import.import_timm(misshaped, variables_template)
  old_layout_head = dict(state_dict)
  old_layout_head["head.weight"] = old_layout_head.pop("head.fc.weight")
  with pytest.raises(ValueError, match=r"head\.fc\.weight"):
    timm_import.import_timm(old_layout_head, variables_template)


@pytest.mark.parametrize("extension", [".safetensors", ".npz"])
def test_checkpoint_files_round_trip(tiny_swin, tmp_path, extension):
  variables_template, state_dict = tiny_swin
  state_dict = dict(state_dict, **{
      "layers.0.blocks.0.attn.relative_position_index": timm_relative_position_index(6)})
  path = str(tmp_path / f"swin{extension}")
  if extension == ".npz":
    np.savez(path, **state_dict)
  else:
    safetensors_numpy.save_file(state_dict, path)
  loaded = timm_import.load_state_dict(path)
  assert sorted(loaded) == sorted(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(loaded[key], value)
    assert loaded[key].dtype == value.dtype
  from_file = timm_import.import_timm(path, variables_template)
  direct = timm_import.import_timm(state_dict, variables_template)
  assert jax.tree.all(jax.tree.map(np.array_equal, from_file, direct))


def test_unsupported_and_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError):
    timm_import.load_state_dict(str(tmp_path / "absent.safetensors"))
  path = tmp_path / "weights.ckpt"
  path.write_bytes(b"")
  with pytest.raises(ValueError, match=r"'\.ckpt'.*\.safetensors, \.npz"):
    timm_import.load_state_dict(str(path))


def test_torch_checkpoints_without_torch_name_the_alternatives(tmp_path):
  try:
    import torch  # noqa: F401
    pytest.skip("torch is installed: .bin files load")
  except ImportError:
    pass
  path = tmp_path / "pytorch_model.bin"
  path.write_bytes(b"")
  with pytest.raises(ImportError, match=r"\.bin.*\.safetensors"):
    timm_import.load_state_dict(str(path))


def test_registry_builds_every_timm_model_and_vit_digits():
  assert all(models.create_model(name, 7).num_classes == 7 for name in models.TIMM_NAMES.values())
  swin_tiny = models.create_model("SwinTiny", 7)
  logits, _ = jax.eval_shape(functools.partial(swin_tiny.init_with_output, train=False),
                             jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  assert logits.shape == (1, 7)
  model = models.create_model("ViTDigits", 10)
  images = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), images)
  logits = jax.jit(functools.partial(model.apply, train=True))(variables, images)
  assert logits.shape == (4, 10) and np.all(np.isfinite(logits))
  with pytest.raises(ValueError, match="8x8"):
    model.apply(variables, jnp.zeros((1, 16, 16, 1)), train=False)
