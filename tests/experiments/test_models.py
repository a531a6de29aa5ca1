"""Model structure: torchvision parameter counts and layer names, output shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import models



def shapes(name, num_classes, image_shape):
  model = models.create_model(name, num_classes)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1,) + image_shape),
                                           train=False))


@pytest.mark.parametrize("name, torchvision_count", [
    ("ResNet18", 11_689_512),  # torchvision.models.resnet18().parameters()
    ("ResNet50", 25_557_032),  # torchvision.models.resnet50().parameters()
])
def test_resnet_parameter_counts_match_torchvision(name, torchvision_count):
  variables = shapes(name, 1000, (224, 224, 3))
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))
  assert count == torchvision_count
  assert set(variables) == {"params", "batch_stats"}


def test_resnet18_layout():
  params = shapes("ResNet18", 1000, (64, 64, 3))["params"]
  assert params["conv1"]["kernel"].shape == (7, 7, 3, 64)
  assert params["layer2_0"]["downsample_0"]["kernel"].shape == (1, 1, 64, 128)
  assert "downsample_0" not in params["layer1_0"]
  assert params["fc"]["kernel"].shape == (512, 1000)
  assert sorted(k for k in params if k.startswith("layer")) == [
      f"layer{s}_{b}" for s in range(1, 5) for b in range(2)]


def test_small_cnn_forward_train_and_eval():
  model = models.create_model("SmallCNN", 10)
  images = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  variables = model.init(jax.random.key(0), images, train=False)
  logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
  assert logits.shape == (4, 10) and logits.dtype == jnp.float32
  assert not jax.tree.all(jax.tree.map(jnp.array_equal, updates["batch_stats"],
                                       variables["batch_stats"]))
  eval_logits = model.apply(variables, images, train=False)
  assert eval_logits.shape == (4, 10)


def test_unknown_model_is_an_error():
  with pytest.raises(ValueError, match="ResNet34"):
    models.create_model("ResNet34", 10)
