"""Tokenizers of pretrained language models, built with the ``tokenizers`` package from a
GGUF file's metadata or from a Hugging Face ``tokenizer.json``.

GGUF stores the vocabulary as ``tokenizer.ggml.tokens`` with ``token_type`` (1 normal,
2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte) and either

* ``tokenizer.ggml.model == "llama"``: a SentencePiece BPE model (Llama 2, Gemma) whose
  ``scores`` rank the pieces. SentencePiece merges the adjacent pair whose union has the
  highest score; that is a BPE whose merges are every split of every piece into two pieces,
  ranked by the score of the union. Spaces become ``▁``, unknown characters fall back to
  the ``<0xNN>`` byte pieces.
* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE with explicit ``merges`` (Llama 3,
  Qwen2, SmolLM2); without ``merges`` every byte-level symbol is a token (the
  byte vocabulary of this project's byte-level models). The pre-tokenizer is GPT-2's
  split; llama.cpp's per-model splitting rules (``tokenizer.ggml.pre``) are not
  reproduced, so rare texts (long digit runs, some punctuation) may split differently
  from the original tokenizer.

Control and user-defined tokens are matched whole before the BPE.
"""

import os
from typing import Optional, Sequence, Union

from experiments.models.llm import CausalLM

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SUPPORTED_GGUF_TOKENIZERS = ("gpt2", "llama")


class Tokenizer:
  """Text to token ids and back, with the model's special ids.

  Attributes:
    backend: the ``tokenizers.Tokenizer``.
    bos_id: beginning-of-sequence id (None if the model has none).
    eos_id: end-of-sequence id (None if the model has none).
    add_bos: whether :meth:`encode` prepends ``bos_id`` by default.
  """

  def __init__(self, backend, *, bos_id: Optional[int] = None, eos_id: Optional[int] = None,
               add_bos: bool = False):
    """Wraps a ``tokenizers.Tokenizer``.

    Args:
      backend: the ``tokenizers.Tokenizer``.
      bos_id: beginning-of-sequence id.
      eos_id: end-of-sequence id.
      add_bos: prepend ``bos_id`` in :meth:`encode` unless told otherwise.

    Raises:
      ValueError: if ``add_bos`` is set without a ``bos_id``.
    """
    if add_bos and bos_id is None:
      raise ValueError("add_bos=True needs a bos_id.")
    self.backend = backend
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.add_bos = add_bos

  @property
  def vocab_size(self) -> int:
    """The number of token ids (special tokens included)."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, *, add_bos: Optional[bool] = None) -> list:
    """The token ids of ``text``.

    Args:
      text: the text.
      add_bos: prepend ``bos_id``; the tokenizer's default when None.

    Returns:
      A list of ints.
    """
    ids = self.backend.encode(text, add_special_tokens=False).ids
    add_bos = self.add_bos if add_bos is None else add_bos
    return ([self.bos_id] if add_bos else []) + list(ids)

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    """The text of token ids (control tokens such as ``<bos>`` left out by default)."""
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def id_to_token(self, token_id: int) -> Optional[str]:
    """The vocabulary string of ``token_id``."""
    return self.backend.id_to_token(int(token_id))


def check_vocab_size(tokenizer: Tokenizer, model: Union[CausalLM, int], *,
                     allow_padded_embeddings: bool = False) -> None:
  """Checks that the tokenizer's ids are the model's.

  Args:
    tokenizer: the tokenizer.
    model: the model, or its vocabulary size.
    allow_padded_embeddings: accept a model vocabulary larger than the tokenizer's (Qwen2
      pads its embedding table to a multiple of 128).

  Raises:
    ValueError: naming both sizes, if they differ (or the tokenizer's is larger).
  """
  model_size = model if isinstance(model, int) else model.config.vocab_size
  size = tokenizer.vocab_size
  if size > model_size or (size < model_size and not allow_padded_embeddings):
    raise ValueError(f"Tokenizer vocabulary size {size} does not match the model's "
                     f"vocab_size {model_size}" + (
                         "" if size > model_size else
                         " (pass allow_padded_embeddings=True if the model's table is padded)")
                     + ".")


def _gguf_field(reader, key, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _special_tokens(tokens, types):
  import tokenizers  # pylint: disable=import-outside-toplevel

  return [tokenizers.AddedToken(token, special=kind == CONTROL, normalized=False)
          for token, kind in zip(tokens, types, strict=True) if kind in (CONTROL, USER_DEFINED)]


def _sentencepiece_bpe(tokens, scores, types, unknown_id, add_space_prefix):
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import decoders  # pylint: disable=import-outside-toplevel
  from tokenizers import normalizers  # pylint: disable=import-outside-toplevel

  vocab = {token: index for index, token in enumerate(tokens)}
  pieces = {token for token, kind in zip(tokens, types, strict=True) if kind == NORMAL}
  merges = []
  for index, (token, kind) in enumerate(zip(tokens, types, strict=True)):
    if kind != NORMAL or len(token) < 2:
      continue
    for split in range(1, len(token)):
      left, right = token[:split], token[split:]
      if left in pieces and right in pieces:
        merges.append((-scores[index], vocab[left], vocab[right], left, right))
  merges.sort()
  model = tokenizers.models.BPE(
      vocab=vocab, merges=[(left, right) for *_, left, right in merges],
      unk_token=None if unknown_id is None else tokens[unknown_id], fuse_unk=True,
      byte_fallback=True)
  backend = tokenizers.Tokenizer(model)
  steps = [normalizers.Replace(" ", "▁")]
  if add_space_prefix:
    steps.insert(0, normalizers.Prepend("▁"))
  backend.normalizer = normalizers.Sequence(steps)
  decode_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
  if add_space_prefix:
    decode_steps.append(decoders.Strip(" ", 1, 0))
  backend.decoder = decoders.Sequence(decode_steps)
  return backend


def _byte_level_bpe(tokens, merges):
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import decoders  # pylint: disable=import-outside-toplevel
  from tokenizers import pre_tokenizers  # pylint: disable=import-outside-toplevel

  vocab = {token: index for index, token in enumerate(tokens)}
  pairs = [tuple(merge.split(" ", 1)) for merge in merges]
  backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=pairs))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  backend.decoder = decoders.ByteLevel()
  return backend


def tokenizer_from_gguf(source, *, model: Union[CausalLM, int, None] = None,
                        allow_padded_embeddings: bool = False) -> Tokenizer:
  """The tokenizer stored in a GGUF file's metadata.

  Args:
    source: a path, or a ``gguf.GGUFReader``.
    model: optional model (or vocabulary size) to check the vocabulary against.
    allow_padded_embeddings: see :func:`check_vocab_size`.

  Returns:
    A :class:`Tokenizer` with the file's bos/eos ids and add-bos default.

  Raises:
    ValueError: for a file without a tokenizer, an unsupported ``tokenizer.ggml.model``
      (naming it and the supported ones), or a vocabulary size that differs from ``model``'s.
  """
  from experiments.importers.gguf import open_gguf  # pylint: disable=import-outside-toplevel

  reader = source if hasattr(source, "fields") else open_gguf(source)
  kind = _gguf_field(reader, "tokenizer.ggml.model")
  tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
  if kind is None or tokens is None:
    raise ValueError("The GGUF file has no tokenizer (tokenizer.ggml.model / "
                     "tokenizer.ggml.tokens).")
  if kind not in SUPPORTED_GGUF_TOKENIZERS:
    raise ValueError(f"Unsupported GGUF tokenizer model {kind!r}; supported: "
                     f"{', '.join(SUPPORTED_GGUF_TOKENIZERS)}.")
  types = _gguf_field(reader, "tokenizer.ggml.token_type", [NORMAL] * len(tokens))
  scores = _gguf_field(reader, "tokenizer.ggml.scores")
  for key, values in [("token_type", types), ("scores", scores)]:
    if values is not None and len(values) != len(tokens):
      raise ValueError(f"tokenizer.ggml.{key} has {len(values)} entries for {len(tokens)} "
                       "tokens.")
  if kind == "llama":
    if scores is None:
      raise ValueError("A SentencePiece ('llama') GGUF tokenizer needs tokenizer.ggml.scores.")
    backend = _sentencepiece_bpe(
        tokens, scores, types, _gguf_field(reader, "tokenizer.ggml.unknown_token_id"),
        _gguf_field(reader, "tokenizer.ggml.add_space_prefix", True))
  else:
    # No merges: every byte-level symbol is its own token (a byte vocabulary).
    backend = _byte_level_bpe(tokens, _gguf_field(reader, "tokenizer.ggml.merges", []))
  backend.add_tokens(_special_tokens(tokens, types))
  tokenizer = Tokenizer(
      backend, bos_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
      eos_id=_gguf_field(reader, "tokenizer.ggml.eos_token_id"),
      add_bos=bool(_gguf_field(reader, "tokenizer.ggml.add_bos_token", False)))
  if model is not None:
    check_vocab_size(tokenizer, model, allow_padded_embeddings=allow_padded_embeddings)
  return tokenizer


def tokenizer_from_json(path: Union[str, os.PathLike], *, bos_token: Optional[str] = None,
                        eos_token: Optional[str] = None, add_bos: bool = False,
                        model: Union[CausalLM, int, None] = None,
                        allow_padded_embeddings: bool = False) -> Tokenizer:
  """A Hugging Face ``tokenizer.json``.

  Args:
    path: the ``tokenizer.json`` file.
    bos_token: the beginning-of-sequence token's string (e.g. ``"<bos>"``), if any.
    eos_token: the end-of-sequence token's string, if any.
    add_bos: prepend the bos id in :meth:`Tokenizer.encode` by default.
    model: optional model (or vocabulary size) to check the vocabulary against.
    allow_padded_embeddings: see :func:`check_vocab_size`.

  Returns:
    A :class:`Tokenizer`.

  Raises:
    ValueError: for a bos/eos token not in the vocabulary, or a vocabulary size that
      differs from ``model``'s.
  """
  import tokenizers  # pylint: disable=import-outside-toplevel

  backend = tokenizers.Tokenizer.from_file(os.fspath(path))
  ids = []
  for name, token in [("bos_token", bos_token), ("eos_token", eos_token)]:
    token_id = None if token is None else backend.token_to_id(token)
    if token is not None and token_id is None:
      raise ValueError(f"{name} {token!r} is not in the vocabulary of {os.fspath(path)}.")
    ids.append(token_id)
  tokenizer = Tokenizer(backend, bos_id=ids[0], eos_id=ids[1], add_bos=add_bos)
  if model is not None:
    check_vocab_size(tokenizer, model, allow_padded_embeddings=allow_padded_embeddings)
  return tokenizer
