"""The language-model study matrix: each cell's weights are quantize_model's, and the
study resumes from its cells file."""

import concurrent.futures
import json
import types

from absl import app
import numpy as np
import pytest

import comq_jax
from comq_jax import bit_allocation
from configs import llm_comq_4bit
from experiments import ptq_study_lm
from experiments import tasks
from experiments.methods import post_training
from quant_core import paths as paths_lib


@pytest.fixture(scope="module")
def study():
  config = llm_comq_4bit.get_config("text")
  config.calibration.batch_size = config.calibration.num_examples = 8
  task = tasks.create_task(config)
  return task, config, task.init_variables(None)


@pytest.fixture(scope="module")
def calibrated(study):
  return ptq_study_lm.CalibratedModel(*study, seed=0)


@pytest.mark.parametrize("method,group_size,magr", [("COMQ", 32, False), ("GPTQ", None, True)])
def test_cell_weights_are_quantize_models(study, calibrated, method, group_size, magr):
  task, config, variables = study
  with concurrent.futures.ThreadPoolExecutor(2) as executor:
    targets = ptq_study_lm.magr_targets(calibrated, group_size, executor) if magr else None
    kernels, value, _ = ptq_study_lm.solve_cell(
        calibrated, ptq_study_lm.make_solver(method, 3, group_size), targets, executor)
  calibration = post_training.calibration_inputs(config, task, task.dataset, (0, 1, 0))
  model, _ = task.bound(variables)
  solver = ptq_study_lm.make_solver(method, 3, group_size, "magr" if magr else None)
  result = comq_jax.quantize_model(model, None, calibration, solver)
  assert [layer.path for layer in result.layers] == calibrated.paths
  for path in calibrated.paths:
    expected = paths_lib.get(result.variables["params"], path.split("/"))["kernel"]
    np.testing.assert_array_equal(np.asarray(kernels[path]), np.asarray(expected))
  np.testing.assert_allclose(value, sum(float(layer.error) ** 2 for layer in result.layers),
                             rtol=1e-5)
  # The perplexity is the job's evaluation of those weights, and differs from FP.
  assert calibrated.perplexity(kernels) != calibrated.perplexity({})


def test_run_resumes_and_reports(study, tmp_path):
  messages = []
  settings = ptq_study_lm.Settings(bits=(3,), group_sizes=(32,), methods=("RTN",),
                                   magr=(False,))
  first = ptq_study_lm.run(*study, settings, str(tmp_path), progress=messages.append)
  assert len(first) == 1 and np.isfinite(first["perplexity"]).all()
  bigger = settings._replace(methods=("RTN", "GPTQ"))
  messages.clear()
  table = ptq_study_lm.run(*study, bigger, str(tmp_path), progress=messages.append)
  # Only the new cell was measured; the old one was read back unchanged.
  assert [message.split(":")[0] for message in messages[1:]] == [
      ptq_study_lm.cell_key(0, 32, 3, "GPTQ", False)]
  with open(tmp_path / ptq_study_lm.CELLS_NAME) as f:
    rows = [json.loads(line) for line in f]
  assert [row["method"] for row in rows] == ["RTN", "GPTQ"]
  assert sorted(table["method"]) == ["GPTQ", "RTN"]
  assert rows[0]["perplexity"] == first["perplexity"].iloc[0]
  report = (tmp_path / ptq_study_lm.REPORT_NAME).read_text()
  assert "## g32: perplexity" in report and "| GPTQ |" in report and "| RTN |" in report


def _options(**overrides):
  values = dict(seeds=["0"], bits=["3"], group_sizes=["128", "channel"], methods=["RTN"],
                magr=["none", "magr"], mixed=[], budgets=["3.5"])
  return types.SimpleNamespace(**{**values, **overrides})


def test_settings_from_flags():
  settings = ptq_study_lm.settings_from_flags(_options())
  assert settings.group_sizes == (128, None) and settings.magr == (False, True)
  for overrides, message in ((dict(methods=["SpQR"]), "--methods: unknown"),
                             (dict(magr=["yes"]), "--magr: unknown"),
                             (dict(bits=["three"]), "take integers"),
                             (dict(mixed=["COMQ+ mixed-hessian"]), "--mixed: unknown"),
                             (dict(budgets=["lots"]), "numbers")):
    with pytest.raises(app.UsageError, match=message):
      ptq_study_lm.settings_from_flags(_options(**overrides))


def test_cells_share_magr_per_seed_and_granularity():
  settings = ptq_study_lm.Settings(seeds=(0, 1), bits=(3, 2), group_sizes=(128, None),
                                   methods=("RTN",), magr=(False, True))
  order = [(seed, group_size) for seed, group_size, *_ in ptq_study_lm.cells(settings)]
  # Each (seed, granularity) is one contiguous run of cells.
  runs = [key for index, key in enumerate(order) if index == 0 or order[index - 1] != key]
  assert runs == [(0, 128), (0, None), (1, 128), (1, None)]
  assert len(order) == 2 * 2 * 2 * 2


def test_job_allocation_by_fisher_is_the_librarys(study, calibrated):
  # The job's sensitivity="fisher": the per-example Fisher of the task's loss over the
  # calibration windows, the round-to-nearest loss increase, then the knapsack.
  task, config, variables = study
  block = types.SimpleNamespace(sensitivity="fisher", bit_choices=(2, 3, 4, 8),
                                bit_budget=4.5)
  solver = comq_jax.comq(3, granularity="group", group_size=32)
  model, _ = task.bound(variables)
  calibration = post_training.calibration_inputs(config, task, task.dataset, (0, 1, 0))
  examples = post_training.fisher_examples(config, task, task.dataset, (0, 1, 0))
  assert len(examples) == 8 and examples[0]["tokens"].shape[0] == 1
  allocation = post_training.allocate(
      block, solver, model, None, calibration, None, {},
      fisher=(post_training.task_loss(task, variables), variables["params"], examples))
  matrices = {path: calibrated.matrices(path) for path in calibrated.paths}
  triple = bit_allocation.objectives_from_fisher(
      calibrated.fisher(), matrices, comq_jax.rtn(3, granularity="group", group_size=32),
      block.bit_choices)
  expected = bit_allocation.allocate_bits(*triple, budget=4.5)
  assert allocation.bits == expected.bits and len(set(allocation.bits.values())) > 1
  np.testing.assert_allclose(allocation.objective, expected.objective, rtol=1e-6)
  # The study's mixed cells use the same allocation, with COMQ+ at each layer's width.
  solvers, study_allocation = ptq_study_lm.mixed_solvers(calibrated, 32, 4.5,
                                                         "COMQ+ mixed-fisher")
  assert study_allocation.bits == expected.bits
  assert {path: s.bits for path, s in solvers.items()} == expected.bits
  assert all(s.iters == 3 and s.scale_update and s.group_size == 32 for s in solvers.values())
  by_grams = post_training.allocate(types.SimpleNamespace(**{**vars(block), "sensitivity": "rtn"}),
                                    solver, model, None, calibration, None, {})
  assert by_grams.bits != allocation.bits
