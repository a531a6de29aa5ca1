"""Tests of experiments.text: corpora, byte tokens, windows, splits and perplexity."""

import math
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import text as text_lib
from experiments.models import llm


def uniform_model(vocab_size):
  """Logits that are the same for every token: perplexity vocab_size."""
  return lambda tokens: jnp.zeros(tokens.shape + (vocab_size,), jnp.float32)


def next_token_model(vocab_size, p):
  """Gives the true next token probability p at every position (it peeks at the input);
  the last position, which predicts nothing, gets the same kind of logits."""
  boost = math.log(p * (vocab_size - 1) / (1.0 - p))

  def model_fn(tokens):
    following = jnp.roll(tokens, -1, axis=1)
    return jax.nn.one_hot(following, vocab_size, dtype=jnp.float32) * boost

  return model_fn


def random_windows(num, length, vocab_size, seed=0):
  return np.random.default_rng(seed).integers(0, vocab_size, (num, length), dtype=np.int32)


@pytest.mark.parametrize("vocab_size,batch_size", [(256, 4), (17, 3)])
def test_uniform_model_perplexity_is_vocab_size(vocab_size, batch_size):
  # 10 windows: the last batch of 3 is padded, and the padding must not count.
  windows = random_windows(10, 9, vocab_size)
  ppl = text_lib.perplexity(uniform_model(vocab_size), windows, batch_size=batch_size)
  # Up to float32 rounding: XLA's log is accurate to a few ulps (~2e-6 of ln 256).
  assert ppl == pytest.approx(vocab_size, rel=1e-5)


@pytest.mark.parametrize("p", [0.5, 0.9, 0.05])
def test_next_token_probability_p_gives_perplexity_one_over_p(p):
  windows = random_windows(7, 16, 32, seed=1)
  ppl = text_lib.perplexity(next_token_model(32, p), windows, batch_size=4, log_every=1)
  assert ppl == pytest.approx(1.0 / p, rel=1e-5)
  # Only L-1 predictions a window: a model that is right there is right everywhere.
  assert text_lib.mean_nll(next_token_model(32, p), windows,
                           batch_size=7) == pytest.approx(-math.log(p), rel=1e-5)


def test_perplexity_of_tiny_llama_nnx_module_and_closure_agree():
  model = llm.create_llm("tiny_llama")
  splits = text_lib.text_windows(text_lib.kjv_text()[:20_000], 32, vocab_size=256,
                                 max_eval_windows=6)
  from_module = text_lib.perplexity(model, splits.evaluation, batch_size=4)
  from_closure = text_lib.perplexity(lambda tokens: model(tokens), splits.evaluation,
                                     batch_size=4)
  assert from_module == pytest.approx(from_closure, rel=1e-5)
  # Randomly initialised: near-uniform over 256 bytes.
  assert 100.0 < from_module < 700.0


def test_token_ids_beyond_the_models_vocabulary_raise():
  windows = text_lib.make_windows(text_lib.encode("Abcdefgh"), 4)
  with pytest.raises(ValueError, match="vocabulary size is 16"):
    text_lib.perplexity(uniform_model(16), windows, batch_size=2)


def test_encode_checks_the_tokenizers_vocabulary():
  class SmallTokenizer:
    vocab_size = 10

    def encode(self, text):
      return [ord(c) - ord("a") for c in text]

  np.testing.assert_array_equal(text_lib.encode("abc", SmallTokenizer()), [0, 1, 2])
  with pytest.raises(ValueError, match="token id 25, but the vocabulary size is 10"):
    text_lib.encode("az", SmallTokenizer())
  with pytest.raises(ValueError, match="vocabulary size is 64"):
    text_lib.encode("\u00e9", vocab_size=64)


def test_windows_do_not_overlap_between_calibration_and_evaluation():
  text = text_lib.kjv_text()[:50_000]
  length = 64
  splits = text_lib.text_windows(text, length, eval_fraction=0.2, num_calibration=40, seed=3)
  tokens = text_lib.encode(text)
  starts = {}
  for name, windows in splits._asdict().items():
    # Every window is a stretch of the text at a multiple of the window length.
    found = set()
    for window in windows:
      matches = [s for s in range(0, len(tokens) - length + 1, length)
                 if np.array_equal(tokens[s:s + length], window)]
      assert matches
      found.add(matches[0])
    starts[name] = found
  assert len(starts["calibration"]) == 40
  assert max(starts["calibration"]) + length <= min(starts["evaluation"])
  full = text_lib.split_windows(text_lib.make_windows(tokens, length), eval_fraction=0.2)
  assert len(full.calibration) + len(full.evaluation) == len(tokens) // length
  assert len(full.evaluation) == round(0.2 * (len(tokens) // length))


def test_bos_windows_start_with_bos_and_continue_the_text():
  class BosBytes(text_lib.ByteTokenizer):
    def encode(self, value):  # a tokenizer that puts its BOS (id 1) before the text
      return np.concatenate([[1], super().encode(value)]).astype(np.int32)

  text = "abcdefghij" * 10  # 100 bytes: 12 windows of 1 + 8
  splits = text_lib.text_windows(text, 9, tokenizer=BosBytes(), eval_fraction=0.25,
                                 bos_id=1)
  windows = np.concatenate([splits.calibration, splits.evaluation])
  assert windows.shape == (12, 9) and np.all(windows[:, 0] == 1)
  # The text tokens, window after window, are the text from its start (BOS not repeated).
  np.testing.assert_array_equal(windows[:, 1:].reshape(-1),
                                text_lib.encode(text)[:96])


def test_calibration_sample_is_reproducible_from_a_seed():
  windows = random_windows(100, 8, 256)
  first = text_lib.sample_windows(windows, 10, seed=7)
  np.testing.assert_array_equal(first, text_lib.sample_windows(windows, 10, seed=7))
  assert not np.array_equal(first, text_lib.sample_windows(windows, 10, seed=8))
  assert len({row.tobytes() for row in first}) == 10
  with pytest.raises(ValueError, match="Cannot sample 101 windows from 100"):
    text_lib.sample_windows(windows, 101, seed=0)


def test_text_shorter_than_one_window_raises():
  with pytest.raises(ValueError, match="shorter than one window: 5 tokens, window_length 8"):
    text_lib.text_windows("short", 8)
  with pytest.raises(ValueError, match="window_length must be at least 2"):
    text_lib.make_windows(text_lib.encode("abc"), 1)
  with pytest.raises(ValueError, match="The text is empty"):
    text_lib.encode("")
  with pytest.raises(ValueError, match="at least 2 windows"):
    text_lib.text_windows("abcdefgh", 8)


def test_corpus_loads_with_its_documented_size():
  text = text_lib.kjv_text()
  assert len(text) >= text_lib.KJV_MIN_CHARS
  assert text.startswith("In the beginning God created the heaven and the earth.")
  assert "[" not in text and "darkness was upon the face of the deep" in text
  assert "darkness [was] upon" in text_lib.kjv_text(keep_brackets=True)


def test_read_text_file(tmp_path):
  path = tmp_path / "prose.txt"
  path.write_text("Caf\u00e9 au lait.\n", encoding="utf-8")
  assert text_lib.read_text_file(path) == "Caf\u00e9 au lait.\n"
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match="is empty"):
    text_lib.read_text_file(tmp_path / "empty.txt")
  with pytest.raises(FileNotFoundError, match="No text file"):
    text_lib.read_text_file(tmp_path / "missing.txt")


def test_byte_tokenizer_round_trips_utf8():
  tokenizer = text_lib.ByteTokenizer()
  sample = "Na\u00efve caf\u00e9, \u65e5\u672c\u8a9e, \U0001f600 and plain ASCII."
  ids = tokenizer.encode(sample)
  assert ids.dtype == np.int32 and len(ids) == len(sample.encode("utf-8"))
  assert ids.min() >= 0 and ids.max() < 256
  assert tokenizer.decode(ids) == sample
  with pytest.raises(UnicodeDecodeError):
    tokenizer.decode([0xE6, 0x97])
  assert tokenizer.decode([0xE6, 0x97], errors="replace") == "\ufffd"


def test_tfds_dataset_not_prepared_raises_with_instructions(tmp_path):
  with pytest.raises(text_lib.TfdsNotPreparedError,
                     match=r"'tiny_shakespeare' is not prepared(.|\n)*tfds build tiny_shakespeare"):
    text_lib.tfds_text("tiny_shakespeare", split="validation", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="not a TFDS dataset"):
    text_lib.tfds_text("no_such_text_dataset", split="test", data_dir=str(tmp_path))


def test_tfds_text_reads_a_prepared_dataset(tmp_path):
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE), \
       mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True):
    text = text_lib.tfds_text("tiny_shakespeare", split="test", data_dir=str(tmp_path),
                              max_examples=2, separator="|")
    with pytest.raises(ValueError, match="no feature 'book_text'"):
      text_lib.tfds_text("tiny_shakespeare", split="test", data_dir=str(tmp_path),
                         text_key="book_text")
  assert isinstance(text, str) and text.count("|") == 1
