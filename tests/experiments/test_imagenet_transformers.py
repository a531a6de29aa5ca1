"""The COMQ paper's transformers on the ImageNet path: model aliases, per-model preprocessing,
timm checkpoints routed to the timm importer, skip_first_last = patch embedding + head(s), and
COMQ smoke runs of DeiT-S and Swin-T through train_and_evaluate on TFDS mock imagenet2012."""

import contextlib
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

import configs
from experiments import input_pipeline
from experiments import models
from experiments import train
from experiments.methods import post_training
from tests.experiments import test_input_pipeline
from tests.experiments import test_timm_import


def imagenet_config(name="comq_4bit", **overrides):
  return configs.apply_overrides(configs.get_config(name, "imagenet"), overrides)


@pytest.mark.parametrize("alias, canonical", [
    ("deit_tiny", "DeiTTiny"), ("deit_small", "DeiTSmall"), ("deit_base", "DeiTBase"),
    ("vit_small", "ViTS16"), ("vit_base", "ViTB16"), ("swin_tiny", "SwinTiny"),
    ("deit_small_distilled_patch16_224", "DeiTSmallDistilled"), ("ResNet18", "ResNet18")])
def test_aliases_name_the_models(alias, canonical):
  assert models.canonical_name(alias) == canonical
  model = models.create_model(alias, 1000)
  assert model == models.MODELS[canonical](num_classes=1000)


def test_create_model_overrides_image_and_window_size():
  swin = models.create_model("swin_tiny", 10, image_size=64, window_size=4)
  assert (swin.image_size, swin.window_size, swin.num_classes) == (64, 4, 10)
  assert models.create_model("deit_small", 10, image_size=32).image_size == 32
  # CNNs pool globally: the image size does not apply to them.
  assert models.create_model("ResNet18", 10, image_size=32) == models.ResNet18(num_classes=10)
  with pytest.raises(ValueError, match="no attribute"):
    models.create_model("ResNet18", 10, window_size=4)
  with pytest.raises(ValueError, match="Unknown model 'deit_smol'"):
    models.canonical_name("deit_smol")


@pytest.mark.parametrize("name, resize, interpolation, mean", [
    # torchvision ResNet weights: resize 256, crop 224, bilinear, ImageNet mean/std.
    ("ResNet18", 256, "bilinear", (0.485, 0.456, 0.406)),
    # timm deit.py / swin_transformer.py _cfg: crop_pct 0.9 (floor(224 / 0.9) = 248), bicubic.
    ("deit_small", 248, "bicubic", (0.485, 0.456, 0.406)),
    ("deit_small_distilled", 248, "bicubic", (0.485, 0.456, 0.406)),
    ("swin_tiny", 248, "bicubic", (0.485, 0.456, 0.406)),
    # timm vision_transformer.py _cfg (augreg weights): crop_pct 0.9, bicubic, mean/std 0.5.
    ("vit_small", 248, "bicubic", (0.5, 0.5, 0.5)),
    ("vit_base", 248, "bicubic", (0.5, 0.5, 0.5))])
def test_preprocessing_follows_the_pretrained_weights(name, resize, interpolation, mean):
  preprocessing = input_pipeline.resolve_preprocessing(imagenet_config(**{"model.name": name}))
  assert preprocessing == (224, resize, interpolation, mean,
                           (0.5,) * 3 if mean == (0.5,) * 3 else (0.229, 0.224, 0.225))


def test_preprocessing_fields_override_the_model_defaults():
  config = imagenet_config(**{"model.name": "deit_small", "data.image_size": 32,
                              "data.interpolation": "bilinear", "data.std": (1.0, 1.0, 1.0)})
  preprocessing = input_pipeline.resolve_preprocessing(config)
  assert preprocessing == (32, math.floor(32 / 0.9), "bilinear", (0.485, 0.456, 0.406),
                           (1.0, 1.0, 1.0))
  assert input_pipeline.resolve_preprocessing(
      imagenet_config(**{"data.resize_size": 240})).resize_size == 240
  with pytest.raises(ValueError, match="expected one of"):
    input_pipeline.resolve_preprocessing(imagenet_config(**{"data.interpolation": "nearest"}))
  with pytest.raises(ValueError, match="No pretrained preprocessing known for model 'SmallCNN'"):
    input_pipeline.resolve_preprocessing(imagenet_config(**{"model.name": "SmallCNN"}))


@pytest.mark.parametrize("name, image_size, ends", [
    ("ResNet18", 32, {"conv1", "fc"}),
    ("deit_small", 32, {"patch_embed/proj", "head"}),
    # Both classifiers of a distilled DeiT: its logits are the mean of `head` and `head_dist`.
    ("deit_small_distilled", 32, {"patch_embed/proj", "head", "head_dist"}),
    ("swin_tiny", 64, {"patch_embed/proj", "head/fc"})])
def test_skip_first_last_is_the_input_layer_and_the_classifiers(name, image_size, ends):
  model = models.create_model(name, 1000, image_size=image_size, window_size=(
      4 if name == "swin_tiny" else None))
  image = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), image, train=False))
  assert post_training.first_and_last_layers(model, variables, image, 1000) == ends


# Smoke runs: DeiT-S at 32 px (2x2 patches + class token), Swin-T at 64 px with window 4
# (stages of 16, 8, 4 and 2 tokens a side: shifted windows in stages 0 and 1, one window in
# stages 2 and 3; Swin's default window 7 divides no stage of a 64-pixel image).
SMOKE = {
    "deit_small": dict(image_size=32, window_size=None, extension=".safetensors",
                       quantized=12 * 6, shapes=dict(test_timm_import.VIT_ARCHITECTURES[
                           "deit_small_patch16_224"], image_size=32)),
    "swin_tiny": dict(image_size=64, window_size=4, extension=".npz",
                      quantized=12 * 6 + 3, shapes=dict(image_size=64, window_size=4)),
}


def random_timm_checkpoint(name, path):
  """A timm state dict with timm's keys and shapes and random values, saved at `path`."""
  setup = SMOKE[name]
  shapes = (test_timm_import.swin_shapes(**setup["shapes"]) if name.startswith("swin")
            else test_timm_import.vit_shapes(**setup["shapes"]))
  rng = np.random.default_rng(0)
  state_dict = {key: (0.02 * rng.standard_normal(shape)).astype(np.float32)
                for key, shape in sorted(shapes.items())}
  if path.endswith(".safetensors"):
    safetensors_numpy.save_file(state_dict, path)
  else:
    np.savez(path, **state_dict)
  return state_dict


def smoke_config(name, checkpoint, method="comq"):
  """{method}_4bit on the 8 mock images, all 8 for calibration; skip_first_last is left at
  its default, which for the timm transformers is the official recipe (patch embedding and
  head(s) in float)."""
  setup = SMOKE[name]
  return imagenet_config(f"{method}_4bit", **{
      "data.num_train_examples": 8, "data.num_eval_examples": 8, "data.shuffle_buffer": 8,
      "batch_size": 4, "eval_batch_size": 4, "num_devices": 1,
      "model.name": name, "model.window_size": setup["window_size"],
      "data.image_size": setup["image_size"], "init_checkpoint": checkpoint,
      "calibration.num_examples": 8, "calibration.batch_size": 4})


@contextlib.contextmanager
def xla_optimizations(enabled):
  """With `enabled`, XLA optimizations are back on (conftest turns most off) in the block: the
  COMQ solves of DeiT-S's and Swin-T's full-size layers then run ~4x faster, which outweighs
  the longer compilations; RTN has no solve, and compiles faster without them."""
  jax.config.update("jax_disable_most_optimizations", not enabled)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", True)


# Times on a shared 2-core CPU (load average 4-6): DeiT-S COMQ 53-67 s, Swin-T RTN 68-73 s,
# Swin-T COMQ 110 s (75 layers of 40 shapes to compile and solve, up to 3072x768). DeiT-S
# runs in the default suite; the Swin-T runs (the same command path, other importer
# tables, which test_timm_import checks on their own) are slow.
@pytest.mark.integration
@pytest.mark.parametrize("name, method", [
    ("deit_small", "comq"),
    pytest.param("swin_tiny", "rtn", marks=pytest.mark.slow),
    pytest.param("swin_tiny", "comq", marks=pytest.mark.slow)])
def test_smoke_run_on_mock_imagenet(name, method, tmp_path):
  """The command's path: timm checkpoint -> FP eval -> COMQ or RTN (patch embedding and head
  in float) -> eval -> results.json, with random weights on mock images."""
  checkpoint = str(tmp_path / f"{name}{SMOKE[name]['extension']}")
  state_dict = random_timm_checkpoint(name, checkpoint)
  workdir = str(tmp_path / "workdir")
  data_mock, prepared_mock = test_input_pipeline.mock_imagenet()
  with data_mock, prepared_mock, xla_optimizations(method == "comq"):
    results = train.train_and_evaluate(smoke_config(name, checkpoint, method), workdir)
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f) == results
  assert (results["model"], results["method"], results["bits"]) == (name, method, 4)
  for key in ("fp_accuracy", "final_accuracy"):
    assert math.isfinite(results[key]) and 0 <= results[key] <= 1
    assert results[key] * 8 == pytest.approx(round(results[key] * 8))
  assert len(results["layers"]) == SMOKE[name]["quantized"]
  head = "head/fc" if name.startswith("swin") else "head"
  skipped = {entry["path"] for entry in results["skipped_layers"]}
  assert skipped == {"patch_embed/proj", head}
  assert all(layer["bits"] == 4 and 0 < layer["error"] <= layer["rtn_error"] * (1 + 1e-6)
             for layer in results["layers"])
  # The imported weights, not a random init, were quantized: the float layers kept them.
  state, _ = train.latest_checkpoint(workdir)
  params = state["variables"]["params"]
  np.testing.assert_array_equal(params["patch_embed"]["proj"]["bias"],
                                state_dict["patch_embed.proj.bias"])
  timm_head = "head.fc" if name.startswith("swin") else "head"
  kernel = params["head"]["fc"]["kernel"] if name.startswith("swin") else params["head"]["kernel"]
  np.testing.assert_array_equal(kernel, state_dict[f"{timm_head}.weight"].T)


@pytest.mark.integration
def test_bad_timm_checkpoint_fails_before_anything_is_written(tmp_path):
  checkpoint = str(tmp_path / "deit.safetensors")
  state_dict = random_timm_checkpoint("deit_small", checkpoint)
  del state_dict["blocks.11.mlp.fc2.bias"]
  safetensors_numpy.save_file(state_dict, checkpoint)
  workdir = tmp_path / "workdir"
  data_mock, prepared_mock = test_input_pipeline.mock_imagenet()
  with data_mock, prepared_mock:
    with pytest.raises(ValueError, match="Missing key 'blocks.11.mlp.fc2.bias'"):
      train.train_and_evaluate(smoke_config("deit_small", checkpoint), str(workdir))
  assert not workdir.exists()
