"""The language-model job (`python -m experiments.llm`): the embedded byte-level model is
trained, quantized by every method, resumed, and scored like the image jobs; bad inputs
are clear errors before anything is written."""

import json
import math
import os

import jax
import numpy as np
import pytest

import configs
import quant_core
from experiments import compare_runs
from experiments import llm_report
from experiments import report
from experiments import tasks
from experiments import text
from experiments import text_data
from experiments import train
from tests.experiments import killed_jobs


def llm_config(name="llm_fp", **overrides):
  return configs.apply_overrides(configs.get_config(name, "text"),
                                 {"num_devices": 1, **overrides})


# ----------------------------------------------------------------------------- end to end


@pytest.mark.integration
def test_embedded_model_trains_quantizes_and_resumes(tmp_path):
  """The embedded default, trained once, then quantized by every method, packed and
  resumed. One test, so that one worker runs it all while the other runs the rest of the
  suite. XLA's optimizations are on here: the training (hundreds of steps) is execution-
  bound, unlike the suite's small compile-bound tests."""
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    workdir = str(tmp_path / "fp")
    fp_run = (train.train_and_evaluate(llm_config(), workdir), train.final_variables(workdir))
    check_fp_run(fp_run)
    for method in ("comq", "gptq"):
      check_4bit_per_channel_is_within_5_percent_of_fp(fp_run, tmp_path / method, method)
    check_packed_model_scores_the_quantized_perplexity(fp_run, tmp_path / "packed")
    check_inq_5bit_within_3_percent_with_every_kernel_in_the_codebook(fp_run,
                                                                      tmp_path / "inq")
    check_resume_mid_inq_step_is_bitwise_identical(fp_run, tmp_path / "resume")
  finally:
    jax.config.update("jax_disable_most_optimizations", True)


def check_fp_run(fp_run):
  """The embedded default trained and scored."""
  results, variables = fp_run
  assert (results["model"], results["method"], results["bits"]) == ("byte_llama", "fp", 32)
  # Uniform guessing over 256 bytes scores 256; a unigram model of English about 20. The
  # default training reaches 4.8 (seed 0).
  assert 1.0 < results["fp_perplexity"] == results["perplexity"] < 8.0
  assert results["seconds"]["fp/train"] > 0 and "fp/evaluate" in results["seconds"]
  # The job's perplexity is experiments.text's on the same windows.
  task = tasks.create_task(llm_config())
  windows = task.dataset.eval_windows
  assert windows.shape == (64, 128)
  expected = text.perplexity(task.module(variables["params"]), windows, batch_size=16)
  np.testing.assert_allclose(results["fp_perplexity"], expected, rtol=1e-5)


def check_4bit_per_channel_is_within_5_percent_of_fp(fp_run, tmp_path, method):
  fp_results, fp_variables = fp_run
  workdir = str(tmp_path)
  results = train.train_and_evaluate(llm_config(f"llm_{method}_4bit"), workdir,
                                     fp_variables=fp_variables)
  assert results["fp_perplexity"] == fp_results["fp_perplexity"]
  assert results["perplexity"] < 1.05 * results["fp_perplexity"]
  # 2 blocks of 7 projections; the embedding (the tied head) stays in float, named.
  assert len(results["layers"]) == 14
  assert all(layer["error"] < layer["rtn_error"] for layer in results["layers"])
  assert results["skipped_layers"] == [
      {"path": "embed", "kind": "embedding", "reason": "tied to the embedding table"}]
  assert set(results["seconds"]) >= {"fp/evaluate", f"{method}/quantize",
                                     f"{method}/evaluate", "pack"}
  for name in ("config.json", "metrics.jsonl", "results.json", train.PACKED_MODEL_FILE):
    assert os.path.isfile(os.path.join(workdir, name))
  assert (os.path.getsize(os.path.join(workdir, train.PACKED_MODEL_FILE))
          == results["packed_file_bytes"] < results["fp32_file_bytes"] / 2)
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f) == results


def check_packed_model_scores_the_quantized_perplexity(fp_run, tmp_path):
  _, fp_variables = fp_run
  config = llm_config("llm_rtn_4bit", eval_packed=True, **{"data.max_eval_windows": 8})
  results = train.train_and_evaluate(config, str(tmp_path), fp_variables=fp_variables)
  # The packed codes through quantized_matmul (interpret mode) are the quantized weights.
  np.testing.assert_allclose(results["packed_perplexity"], results["perplexity"], rtol=1e-4)
  state, _ = train.latest_checkpoint(str(tmp_path))
  packed = quant_core.deploy.load_packed(
      os.path.join(str(tmp_path), train.PACKED_MODEL_FILE), like=state["variables"])
  is_packed = lambda leaf: isinstance(leaf, quant_core.deploy.PackedLayer)
  kernels = [leaf for leaf in jax.tree.leaves(packed, is_leaf=is_packed) if is_packed(leaf)]
  assert len(kernels) == 14


def check_inq_5bit_within_3_percent_with_every_kernel_in_the_codebook(fp_run, tmp_path):
  fp_results, fp_variables = fp_run
  # The default schedule, each portion retrained for one epoch of 1024 windows (32 steps).
  results = train.train_and_evaluate(
      llm_config("llm_inq_5bit", **{"data.num_train_windows": 1024}), str(tmp_path),
      fp_variables=fp_variables)
  assert results["codebook_fraction"] == 1.0
  assert results["fp_perplexity"] == fp_results["fp_perplexity"]
  assert results["perplexity"] < 1.03 * results["fp_perplexity"]
  assert [entry["portion"] for entry in results["portion_perplexities"]] == [
      0.5, 0.75, 0.875, 1.0]
  assert results["seconds"]["inq_0.5/train"] > 0


def check_resume_mid_inq_step_is_bitwise_identical(fp_run, tmp_path):
  _, fp_variables = fp_run
  # 512 training windows: 16 steps per epoch; INQ 0.5 -> 1, one epoch of retraining.
  config = llm_config("llm_inq_5bit", **{
      "data.num_train_windows": 512, "inq.schedule": (0.5, 1.0),
      "checkpoint_every_steps": 4, "log_every_steps": 4, "data.max_eval_windows": 8})
  reference = train.train_and_evaluate(config, str(tmp_path / "uninterrupted"),
                                       fp_variables=fp_variables)
  interrupted = str(tmp_path / "interrupted")
  # 10 steps into the 0.5 portion, between two checkpoints (the FP phase only evaluates).
  stopping = configs.apply_overrides(config, {"stop_after_steps": 10})
  assert train.train_and_evaluate(stopping, interrupted, fp_variables=fp_variables) is None
  _, progress = train.latest_checkpoint(interrupted)
  assert (progress["phase"], progress["step_in_phase"]) == (1, 10)
  resumed = train.train_and_evaluate(config, interrupted, fp_variables=fp_variables)
  assert compare_runs.results_differences(resumed, reference) == []
  expected, _ = train.latest_checkpoint(str(tmp_path / "uninterrupted"))
  actual, _ = train.latest_checkpoint(interrupted)
  jax.tree.map(np.testing.assert_array_equal, actual, expected)


# A short INQ run of the embedded model: 256 training windows (8 steps per epoch), one FP
# epoch, portions 0.5 -> 1; logging and checkpointing every 2 steps, so that a kill can be
# timed from metrics.jsonl and lands after a finished checkpoint.
SHORT_INQ_FLAGS = ["--config=llm_inq_5bit", "--config.fp.num_epochs=1",
                   "--config.fp.lr_decay_epoch=1", "--config.data.num_train_windows=256",
                   "--config.inq.schedule=(0.5,1.0)", "--config.data.max_eval_windows=8",
                   "--config.checkpoint_every_steps=2", "--config.log_every_steps=2",
                   "--config.num_devices=1"]


@pytest.mark.integration
def test_sigkill_during_inq_retraining_then_rerun_matches_uninterrupted(tmp_path):
  """`python -m experiments.llm` killed inside the INQ 0.5 portion, then run again in
  the same workdir, ends as the uninterrupted run does, bit for bit."""
  # Killed 4 steps into the 0.5 portion (of 8): the checkpoint of step 2 exists by then
  # (an Orbax save runs while later steps train, so the one of step 4 may be unfinished).
  rerun, results = killed_jobs.kill_rerun_and_compare("experiments.llm", SHORT_INQ_FLAGS,
                                                      tmp_path, "inq_0.5", 4)
  # The rerun resumed inside the 0.5 portion: it logged no FP training again.
  assert rerun[0]["phase_name"] == "inq_0.5" and rerun[0]["step_in_phase"] > 2
  assert results["codebook_fraction"] == 1.0


# ----------------------------------------------------------------------------- bad input


def test_unknown_model_name_is_an_error_listing_the_known_ones(tmp_path):
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match="Unknown language model 'gemma_270m'.*gemma3_270m"):
    train.train_and_evaluate(llm_config(**{"model.name": "gemma_270m"}), workdir)
  assert not os.path.exists(workdir)


def test_pretrained_model_without_weights_says_what_to_set(tmp_path):
  with pytest.raises(ValueError, match="smollm2_135m.*init_checkpoint"):
    train.train_and_evaluate(llm_config(**{"model.name": "smollm2_135m"}), str(tmp_path))


def test_missing_checkpoint_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    text_data.model_source(llm_config(**{"model.name": "gemma3_270m",
                                         "init_checkpoint": str(tmp_path / "x.gguf")}))


def test_gguf_of_an_unsupported_architecture_is_an_error(tmp_path):
  gguf = pytest.importorskip("gguf")
  path = str(tmp_path / "model.gguf")
  writer = gguf.GGUFWriter(path, "gpt2")
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  workdir = str(tmp_path / "run")
  config = llm_config(**{"model.name": "gemma3_270m", "init_checkpoint": path})
  with pytest.raises(ValueError, match="gpt2"):
    train.train_and_evaluate(config, workdir)
  assert not os.path.exists(workdir)


def test_tokenizer_that_does_not_match_the_vocabulary_is_an_error():
  class SmallTokenizer:
    vocab_size = 100

    def encode(self, value):
      return [ord(c) % 100 for c in value]

  # Checked where the task meets the model: ids beyond the model's vocabulary, or a
  # byte-level model asked for a vocabulary that is not the byte tokenizer's.
  config = llm_config(**{"model.name": "tiny_llama"})
  with pytest.raises(ValueError, match="vocab"):
    text_data.create_text_dataset(config, SmallTokenizer(), 64)
  source = text_data.ModelSource("smollm2_135m", None)

  class FakeModel:
    config = type("C", (), {"vocab_size": 49_152})

  with pytest.raises(ValueError, match="vocab_size 49152.*byte tokenizer"):
    source.tokenizer(FakeModel())


def test_skip_first_last_on_a_language_model_is_an_error(tmp_path):
  workdir = str(tmp_path / "run")
  config = llm_config("llm_gptq_4bit", **{"gptq.skip_first_last": True})
  with pytest.raises(ValueError, match="gptq.skip_first_last is for image models"):
    train.train_and_evaluate(config, workdir)
  assert not os.path.exists(workdir)


def test_text_shorter_than_a_window_is_an_error(tmp_path):
  path = tmp_path / "short.txt"
  path.write_text("In the beginning")
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match="shorter than one window: 16 tokens, window_length 128"):
    train.train_and_evaluate(llm_config(**{"data.corpus": str(path)}), workdir)
  assert not os.path.exists(workdir)


def test_any_text_file_is_a_corpus(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_text("abcdefgh" * 200)  # 1600 bytes: 12 windows of 128
  config = llm_config(**{"data.corpus": str(path), "data.num_train_windows": 0,
                         "data.max_eval_windows": 0})
  data = tasks.create_task(config).dataset
  assert (data.num_train_examples, len(data.eval_windows)) == (11, 1)
  batch = next(data.eval_batches(4))
  assert batch["tokens"].shape == (4, 128) and batch["mask"].tolist() == [1, 0, 0, 0]
  assert math.isclose(float(batch["tokens"][0, 1]), ord("b"))


# ----------------------------------------------------------------------------- report


def fake_run(method, perplexity, seed=0, **config):
  results = {"method": method, "bits": 32 if method == "fp" else 4, "model": "m",
             "fp_perplexity": 10.0 + seed, "perplexity": perplexity, "seed": seed,
             "seconds": {f"{method}/quantize": 3.0, "fp/evaluate": 1.0}}
  return report.Run(f"{method}{seed}", results, {f"{method}.granularity": "group",
                                                  f"{method}.group_size": 128, **config})


def test_report_puts_the_methods_side_by_side_with_their_ratio_to_fp():
  runs = [fake_run("fp", 10.0), fake_run("rtn", 20.0), fake_run("gptq", 13.0),
          fake_run("gptq", 12.0, **{"gptq.act_order": True}),
          fake_run("comq", 12.5, **{"comq.init": "gptq"}),
          fake_run("comq", 14.0, seed=0), fake_run("comq", 16.0, seed=1)]
  perplexity, seconds = llm_report.tables(runs)[0].split("### m: seconds to quantize")
  assert "| bits | grid | FP | RTN | GPTQ | GPTQ act-order | COMQ | COMQ from GPTQ |" in (
      perplexity)
  # FP perplexity: the mean over the runs (10 and 11 for the two seeds).
  fp = np.mean([10.0] * 6 + [11.0])
  assert f"| 4 | g128 |  | 20.00 ({20 / fp:.3f}x) |" in perplexity
  assert f"15.00 ± 1.41 ({15 / fp:.3f}x)" in perplexity  # COMQ over seeds 0 and 1
  assert "| 4 | g128 |  | 3 | 3 | 3 | 3 | 3 |" in seconds


def test_report_of_language_model_runs_only_speaks_of_perplexity(tmp_path):
  for method, perplexity in (("fp", 10.0), ("gptq", 12.0)):
    run_dir = tmp_path / method
    run_dir.mkdir()
    block = {"bits": 4, "granularity": "group", "group_size": 128}
    (run_dir / "config.json").write_text(json.dumps(
        {"name": "llm", "seed": 0, "method": method, "model": {"name": "m"}, "gptq": block}))
    results = fake_run(method, perplexity).results
    (run_dir / "results.json").write_text(json.dumps(
        dict(results, portion_perplexities=[], packed_perplexity=None)))
  with open(report.write_report(str(tmp_path))["report.md"]) as f:
    markdown = f.read()
  assert "2 runs under" in markdown and "held-out perplexity, mean ± sample" in markdown
  assert "accuracy" not in markdown and "Δ" not in markdown
  assert "| 4 | g128 |  | 12.00 (1.200x) |" in markdown
