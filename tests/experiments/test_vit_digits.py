"""ViTDigits through train_and_evaluate on digits: COMQ and INQ end to end, few steps.

The DenseGeneral attention kernels (query/key/value 64x4x16, out 4x16x64) are quantized
like every other kernel; LayerNorms, the class token, the position embedding and the
biases stay float.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import configs
from experiments import train
import quant_core

# Integration: every test runs train_and_evaluate.
pytestmark = pytest.mark.integration

BLOCK_LAYERS = ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/fc1", "mlp/fc2")
# ViTDigits' linear layers in forward order: what COMQ quantizes and INQ's predicate picks.
LAYERS = (["patch_embed/proj"] + [f"blocks_{block}/{layer}" for block in range(4)
                                  for layer in BLOCK_LAYERS] + ["head"])


def tiny_config(name, **overrides):
  """The named config on 10% of the digits for training (179 images, 11 steps/epoch).

  One FP epoch, checkpointed at its last step and kept, so the FP weights can be
  compared with the quantized ones; 32 calibration images.
  """
  fields = {"data.test_size": 0.9, "fp.num_epochs": 1, "fp.lr_decay_epoch": 1,
            "checkpoint_every_steps": 11, "max_checkpoints_to_keep": 3,
            "log_every_steps": 11, "num_devices": 1,
            "calibration.num_examples": 32, "calibration.batch_size": 16}
  fields.update(overrides)
  return configs.apply_overrides(configs.get_config(name, "digits"), fields)


def checkpointed_params(workdir):
  """Params of every checkpoint the run kept, oldest first."""
  params = []
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
    for step in manager.all_steps():
      state = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore()))["state"]
      params.append(jax.device_get(state["variables"]["params"]))
  return params


def leaves_by_name(params):
  """{"blocks_0/attn/query/kernel": array, ...}."""
  return {"/".join(entry.key for entry in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def assert_only_kernels_changed(fp_params, quantized_params):
  fp, quantized = leaves_by_name(fp_params), leaves_by_name(quantized_params)
  assert fp.keys() == quantized.keys()
  kernels = {f"{layer}/kernel" for layer in LAYERS}
  assert kernels <= fp.keys()
  for name in fp:
    if name in kernels:
      assert not np.array_equal(fp[name], quantized[name]), name
    else:  # LayerNorm, cls_token, pos_embed, biases
      np.testing.assert_array_equal(fp[name], quantized[name], err_msg=name)


@pytest.fixture(scope="module")
def comq_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("comq_vit"))
  config = tiny_config("comq_4bit_vit", **{"comq.granularity": "group",
                                           "comq.group_size": 32})
  return train.train_and_evaluate(config, workdir), workdir


def test_comq_quantizes_attention_kernels(comq_run):
  results, workdir = comq_run
  assert (results["model"], results["method"], results["bits"]) == ("ViTDigits", "comq", 4)
  assert 0.0 <= results["final_accuracy"] <= 1.0 and np.isfinite(results["final_accuracy"])
  layers = {layer["path"]: layer for layer in results["layers"]}
  assert list(layers) == LAYERS and results["skipped_layers"] == []
  assert layers["blocks_0/attn/query"]["shape"] == [64, 4, 16]
  assert layers["blocks_0/attn/out"]["shape"] == [4, 16, 64]
  fp_params, *_, quantized_params = checkpointed_params(workdir)
  assert_only_kernels_changed(fp_params, quantized_params)
  kernels = leaves_by_name(quantized_params)
  for path, layer in layers.items():
    groups, d_in, d_out = layer["matrices"]
    assert np.isfinite(layer["error"]) and layer["error"] <= layer["rtn_error"], path
    # Contracted axes come first in every kernel here: the 2-D view is a reshape.
    matrix = kernels[f"{path}/kernel"].reshape(groups * d_in, d_out)
    for start in range(0, d_in, 32):  # at most 16 levels per group of 32 inputs
      levels = max(len(np.unique(matrix[start:start + 32, j])) for j in range(d_out))
      assert levels <= 2**4, path


def test_inq_puts_every_kernel_in_the_codebook(tmp_path):
  # No FP training (the COMQ test trains): INQ on the initial weights, one epoch of
  # retraining with half of every kernel frozen, then the rest quantized.
  config = tiny_config("inq_5bit_vit", **{"fp.num_epochs": 0, "inq.schedule": (0.5, 1.0),
                                          "inq.epochs_per_step": 1,
                                          "inq.lr_decay_epoch": 1,
                                          "checkpoint_every_steps": 1000})
  results = train.train_and_evaluate(config, str(tmp_path))
  assert (results["model"], results["method"], results["bits"]) == ("ViTDigits", "inq", 5)
  assert results["codebook_fraction"] == 1.0
  assert [entry["portion"] for entry in results["portion_accuracies"]] == [0.5, 1.0]
  assert np.isfinite(results["final_accuracy"])
  params = checkpointed_params(str(tmp_path))[-1]
  mask = leaves_by_name(quant_core.quantizable_mask(params))
  assert {name for name, quantizable in mask.items() if quantizable} == {
      f"{layer}/kernel" for layer in LAYERS}
  for name, leaf in leaves_by_name(params).items():
    nonzero = np.abs(leaf[leaf != 0])
    powers_of_two = np.all(np.log2(nonzero) == np.round(np.log2(nonzero)))
    # Kernels: 0 or ±2^k. LayerNorm, embeddings and biases: float, retrained.
    assert powers_of_two == mask[name], name
