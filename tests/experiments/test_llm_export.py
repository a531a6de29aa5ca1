"""`--config.export=gptq` of the language-model job (experiments.llm_export)."""

import os

import numpy as np
import pytest

import configs
from experiments import llm_export
from experiments import tasks
from experiments import train
from experiments.importers import hf_safetensors
from experiments.models.llm import LLM_CONFIGS
from tests.quant_core.test_export_gptq import read_gptq


def llm_config(name, **overrides):
  return configs.apply_overrides(configs.get_config(name, "text"),
                                 {"num_devices": 1, **overrides})


def test_job_writes_a_gptq_checkpoint_of_its_weights(tmp_path):
  """The embedded model (untrained, to keep it short) through RTN 4-bit g32 and the
  export: the checkpoint de-quantizes to the run's final kernels exactly."""
  config = llm_config("llm_rtn_4bit", export="gptq", progress=False, **{
      "rtn.scale_dtype": "float16", "rtn.granularity": "group", "rtn.group_size": 32,
      "data.max_eval_windows": 4, "calibration.num_examples": 16})
  fp_variables = tasks.create_task(config).init_variables(None)
  workdir = str(tmp_path / "run")
  results = train.train_and_evaluate(config, workdir, fp_variables=fp_variables)
  assert "export" in results["seconds"]
  weights, hf_config, tensors = read_gptq(os.path.join(workdir, "gptq_checkpoint"))
  assert hf_config["architectures"] == ["LlamaForCausalLM"]
  assert hf_config["quantization_config"]["group_size"] == 32
  params = train.final_variables(workdir)["params"]
  names = llm_export.hf_module_names(LLM_CONFIGS["byte_llama"])
  assert sorted(weights) == sorted(names.values()) and len(weights) == 14
  for path, name in names.items():
    kernel = params
    for part in path.split("/"):
      kernel = kernel[part] if part in kernel else kernel[int(part)]
    np.testing.assert_array_equal(weights[name], np.asarray(kernel["kernel"]).T)
  assert tensors["model.embed_tokens.weight"].dtype == np.float16
  assert "model.norm.weight" in tensors and "lm_head.weight" not in tensors


def test_module_names_invert_the_importer():
  config = LLM_CONFIGS["tiny_qwen"]
  names = llm_export.hf_module_names(config)
  key_map = hf_safetensors.hf_key_map(config)
  assert names["layers/1/attn/k_proj"] == "model.layers.1.self_attn.k_proj"
  assert names["lm_head"] == "lm_head"
  for path, name in names.items():
    assert "/".join(map(str, key_map[name + ".weight"].path[:-1])) == path
  assert llm_export.hf_config(config)["architectures"] == ["Qwen2ForCausalLM"]
  assert llm_export.hf_config(LLM_CONFIGS["tiny_gemma3"])["model_type"] == "gemma3_text"


@pytest.mark.parametrize("overrides, match", [
    ({"export": "awq"}, "export must be one of"),
    ({"export": "gptq"}, "scale_dtype=float16"),
    ({"export": "gptq", "gptq.scale_dtype": "float16", "gptq.bits": 5}, "bits=5"),
    ({"export": "gptq", "gptq.scale_dtype": "float16", "gptq.bit_budget": 3.0},
     "bit_budget"),
])
def test_exports_the_run_cannot_produce_are_refused_before_it_starts(overrides, match):
  with pytest.raises(ValueError, match=match):
    llm_export.check_export(llm_config("llm_gptq_4bit", **overrides))
  with pytest.raises(ValueError, match="needs a post-training method"):
    llm_export.check_export(llm_config("llm_inq_5bit", export="gptq"))
