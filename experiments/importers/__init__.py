"""Pretrained weights and tokenizers for the decoder language models of
experiments.models.llm: Hugging Face safetensors state dicts (:func:`load_hf_state_dict`),
GGUF files of llama.cpp (:func:`load_gguf`), and tokenizers from GGUF metadata or a
``tokenizer.json`` (:class:`Tokenizer`).

``gguf`` and ``tokenizers`` are imported only when used.
"""

from experiments.importers.gguf import SUPPORTED_ARCHITECTURES
from experiments.importers.gguf import dequantize_tensor
from experiments.importers.gguf import gguf_config
from experiments.importers.gguf import gguf_hyperparameters
from experiments.importers.gguf import gguf_name
from experiments.importers.gguf import gguf_state_dict
from experiments.importers.gguf import load_gguf
from experiments.importers.gguf import open_gguf
from experiments.importers.gguf import permute_rows
from experiments.importers.gguf import unpermute_rows
from experiments.importers.hf_safetensors import hf_key_map
from experiments.importers.hf_safetensors import load_hf_safetensors
from experiments.importers.hf_safetensors import load_hf_state_dict
from experiments.importers.hf_safetensors import resolve_model
from experiments.importers.tokenizer import Tokenizer
from experiments.importers.tokenizer import check_vocab_size
from experiments.importers.tokenizer import tokenizer_from_gguf
from experiments.importers.tokenizer import tokenizer_from_json

__all__ = [
    "SUPPORTED_ARCHITECTURES", "Tokenizer", "check_vocab_size", "dequantize_tensor",
    "gguf_config", "gguf_hyperparameters", "gguf_name", "gguf_state_dict", "hf_key_map",
    "load_gguf", "load_hf_safetensors", "load_hf_state_dict", "open_gguf", "permute_rows",
    "resolve_model", "tokenizer_from_gguf", "tokenizer_from_json", "unpermute_rows",
]
