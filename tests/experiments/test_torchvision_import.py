"""torchvision state dicts (built here from the architecture, random values) import exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from experiments import models
from experiments import torchvision_import



def torchvision_resnet18_state_dict(num_classes, rng):
  """torchvision resnet18 keys and shapes, written from the architecture description."""
  shapes = {"conv1.weight": (64, 3, 7, 7)}

  def bn(prefix, channels):
    for name in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{prefix}.{name}"] = (channels,)
    shapes[f"{prefix}.num_batches_tracked"] = ()

  bn("bn1", 64)
  in_channels = 64
  for stage, channels in enumerate((64, 128, 256, 512), start=1):
    for block in range(2):
      prefix = f"layer{stage}.{block}"
      shapes[f"{prefix}.conv1.weight"] = (channels, in_channels, 3, 3)
      bn(f"{prefix}.bn1", channels)
      shapes[f"{prefix}.conv2.weight"] = (channels, channels, 3, 3)
      bn(f"{prefix}.bn2", channels)
      if in_channels != channels:
        shapes[f"{prefix}.downsample.0.weight"] = (channels, in_channels, 1, 1)
        bn(f"{prefix}.downsample.1", channels)
      in_channels = channels
  shapes["fc.weight"] = (num_classes, 512)
  shapes["fc.bias"] = (num_classes,)
  state_dict = {}
  for key, shape in shapes.items():
    if key.endswith("num_batches_tracked"):
      state_dict[key] = np.array(7, np.int64)
    elif key.endswith("running_var"):
      state_dict[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      state_dict[key] = rng.normal(size=shape).astype(np.float32)
  return state_dict


@pytest.fixture(scope="module")
def setup():
  model = models.create_model("ResNet18", 10)
  template = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  state_dict = torchvision_resnet18_state_dict(10, np.random.default_rng(0))
  return model, template, state_dict


@pytest.mark.parametrize("extension", [".npz", ".safetensors"])
def test_import_fills_every_variable(setup, tmp_path, extension):
  model, template, state_dict = setup
  path = str(tmp_path / f"resnet18{extension}")
  if extension == ".npz":
    np.savez(path, **state_dict)
  else:
    safetensors_numpy.save_file(state_dict, path)
  variables = torchvision_import.import_torchvision(path, template)
  num_tensors = len(jax.tree.leaves(variables))
  assert num_tensors == len([k for k in state_dict if not k.endswith("num_batches_tracked")])
  assert jax.tree.structure(variables) == jax.tree.structure(template)
  np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], state_dict["fc.weight"].T)
  np.testing.assert_array_equal(variables["batch_stats"]["layer3_0"]["downsample_1"]["var"],
                                state_dict["layer3.0.downsample.1.running_var"])
  np.testing.assert_array_equal(variables["params"]["layer1_1"]["bn2"]["scale"],
                                state_dict["layer1.1.bn2.weight"])


def test_imported_conv_matches_torch_convolution(setup):
  model, template, state_dict = setup
  variables = torchvision_import.convert_state_dict(state_dict, template)
  images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  # Stem conv alone, via flax, vs torch semantics: NCHW input, OIHW weight, stride 2, pad 3.
  stem = models.conv(64, 7, 2, "conv1")
  ours = stem.apply({"params": variables["params"]["conv1"]}, images)
  reference = jax.lax.conv_general_dilated(
      np.transpose(images, (0, 3, 1, 2)), state_dict["conv1.weight"], window_strides=(2, 2),
      padding=((3, 3), (3, 3)), dimension_numbers=("NCHW", "OIHW", "NCHW"))
  np.testing.assert_allclose(np.transpose(ours, (0, 3, 1, 2)), reference, rtol=1e-4, atol=1e-4)
  logits = model.apply(variables, images, train=False)
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits))


def test_missing_unexpected_and_misshaped_keys_are_named(setup):
  _, template, state_dict = setup
  missing = dict(state_dict)
  del missing["layer2.0.downsample.1.running_mean"]
  with pytest.raises(ValueError, match=r"layer2\.0\.downsample\.1\.running_mean"):
    torchvision_import.convert_state_dict(missing, template)
  extra = dict(state_dict, **{"layer5.0.conv1.weight": np.zeros((1, 1, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"layer5\.0\.conv1\.weight"):
    torchvision_import.convert_state_dict(extra, template)
  misshaped = dict(state_dict, **{"fc.weight": np.zeros((1000, 512), np.float32)})
  with pytest.raises(ValueError, match=r"fc\.weight"):
    torchvision_import.convert_state_dict(misshaped, template)


def test_unsupported_and_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError):
    torchvision_import.load_state_dict(str(tmp_path / "absent.npz"))
  path = tmp_path / "weights.bin"
  path.write_bytes(b"")
  with pytest.raises(ValueError, match=".bin"):
    torchvision_import.load_state_dict(str(path))
