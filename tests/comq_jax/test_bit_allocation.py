"""Tests of the mixed-precision bit allocator (comq_jax.bit_allocation)."""

import itertools
import json
import math

import jax
import numpy as np
import pytest
from flax import linen as nn

import comq_jax
import quant_core
from comq_jax import bit_allocation
from comq_jax.results import LayerReport
from comq_jax.results import ModelQuantization

_BITS = (2, 3, 4, 8)
_SLACK = 1 + 1e-9  # The allocator's float tolerance on the budget.


def _random_case(seed, integer_costs=True):
  """``(objectives, costs, weights)``: 5-6 layers, each with its own subset of
  bits; objectives fall and costs rise with bits."""
  rng = np.random.default_rng(seed)
  objectives, costs, weights = {}, {}, {}
  for layer in range(int(rng.integers(5, 7))):
    path = f"layer_{layer}"
    bits = sorted(rng.choice(_BITS, size=int(rng.integers(2, 5)), replace=False).tolist())
    count = int(rng.integers(8, 64))
    overhead = rng.integers(0, 40) if integer_costs else rng.uniform(0.0, 40.0)
    falls = np.sort(rng.uniform(0.0, 10.0, len(bits)))[::-1] * rng.uniform(0.5, 5.0)
    objectives[path] = {b: float(value) for b, value in zip(bits, falls, strict=True)}
    costs[path] = {b: b * count + overhead for b in bits}
    if not integer_costs:
      costs[path] = {b: float(cost) + float(rng.uniform(0.0, 1.0))
                     for b, cost in costs[path].items()}
    weights[path] = count
  return objectives, costs, weights


def _brute_force(objectives, costs, weights, budget):
  """``(objective, bits)`` of the best allocation within the budget, by enumeration."""
  allowed = budget * sum(weights.values()) * _SLACK
  best = (math.inf, None)
  for choice in itertools.product(*(sorted(table) for table in objectives.values())):
    cost = sum(costs[path][b] for path, b in zip(objectives, choice, strict=True))
    if cost <= allowed:
      value = sum(objectives[path][b] for path, b in zip(objectives, choice, strict=True))
      best = min(best, (value, choice))
  return best


def _total(table, pick):
  return sum(table[path][pick(table[path])] for path in table)


@pytest.mark.parametrize("seed", range(5))
def test_exact_costs_match_brute_force(seed):
  objectives, costs, weights = _random_case(seed)
  total_weights = sum(weights.values())
  low, high = _total(costs, min), _total(costs, max)
  for allowed in np.linspace(low, high, 4).round().astype(int):
    # One unit is one bit: every cost is a whole number of units.
    budget = float(allowed) / total_weights
    allocation = bit_allocation.allocate_bits(objectives, costs, weights, budget,
                                              resolution=int(allowed))
    expected, _ = _brute_force(objectives, costs, weights, budget)
    assert allocation.objective == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert allocation.average_bits <= budget * _SLACK
    assert allocation.weights == total_weights
    assert allocation.budget == budget
    assert list(allocation.bits) == list(objectives)
    chosen_cost = sum(costs[path][b] for path, b in allocation.bits.items())
    assert allocation.average_bits == pytest.approx(chosen_cost / total_weights)


@pytest.mark.parametrize("seed", range(3))
def test_rounded_costs_stay_within_budget(seed):
  objectives, costs, weights = _random_case(seed, integer_costs=False)
  total_weights = sum(weights.values())
  low, high = _total(costs, min), _total(costs, max)
  for budget in np.linspace(low, high, 5)[1:-1] / total_weights:
    expected, _ = _brute_force(objectives, costs, weights, budget)
    coarse = bit_allocation.allocate_bits(objectives, costs, weights, budget, resolution=64)
    assert coarse.average_bits <= budget * _SLACK
    assert coarse.objective >= expected * (1 - 1e-12)
    fine = bit_allocation.allocate_bits(objectives, costs, weights, budget,
                                        resolution=10**6)
    assert fine.average_bits <= budget * _SLACK
    assert fine.objective == pytest.approx(expected, rel=1e-12)


def test_larger_budgets_never_do_worse_and_the_ends_take_the_extreme_bits():
  objectives, costs, weights = _random_case(7)
  total_weights = sum(weights.values())
  low, high = _total(costs, min), _total(costs, max)
  found = [bit_allocation.allocate_bits(objectives, costs, weights, allowed / total_weights,
                                        resolution=int(allowed)).objective
           for allowed in range(low, high + 1, max(1, (high - low) // 25))]
  assert all(later <= earlier for earlier, later in itertools.pairwise(found))
  at_most = bit_allocation.allocate_bits(objectives, costs, weights, high / total_weights,
                                         resolution=int(high))
  assert at_most.bits == {path: max(table) for path, table in objectives.items()}
  at_least = bit_allocation.allocate_bits(objectives, costs, weights, low / total_weights,
                                          resolution=int(low))
  assert at_least.bits == {path: min(table) for path, table in objectives.items()}
  assert at_least.average_bits == pytest.approx(low / total_weights)


def test_ties_go_to_fewer_units_then_lower_bits():
  weights = {"a": 10, "b": 10}
  # Equal objectives: the cheaper choice wins; equal costs too: the lower bits.
  allocation = bit_allocation.allocate_bits(
      {"a": {2: 1.0, 4: 1.0}, "b": {3: 0.5, 5: 0.5}}, {"a": {2: 20, 4: 40}, "b": {3: 30, 5: 30}},
      weights, budget=8.0)
  assert allocation.bits == {"a": 2, "b": 3}
  assert allocation.average_bits == 2.5
  assert json.loads(json.dumps(allocation.record())) == allocation.record()


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(24)(x))
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(6)(x)


@pytest.fixture(scope="module")
def tiny_model():
  model = _MLP()
  keys = jax.random.split(jax.random.key(0), 2)
  batches = [jax.random.normal(key, (32, 12)) for key in keys]
  variables = model.init(jax.random.key(1), batches[0])
  grams = quant_core.layer_grams(model, variables, batches)
  matrices = bit_allocation.layer_matrices(model, variables, batches[0])
  runs = {bits: comq_jax.quantize_model(model, variables, batches, comq_jax.rtn(bits))
          for bits in _BITS}
  return model, variables, batches, grams, matrices, runs


def test_objectives_from_grams_equal_whole_model_runs(tiny_model):
  _, variables, _, grams, matrices, runs = tiny_model
  assert list(matrices) == ["Dense_0", "Dense_1", "Dense_2"] == list(grams)
  np.testing.assert_array_equal(matrices["Dense_1"][0],
                                variables["params"]["Dense_1"]["kernel"])
  objectives, costs, weights = bit_allocation.objectives_from_grams(
      grams, matrices, comq_jax.rtn(4), _BITS)
  for table in objectives.values():
    ordered = [table[bits] for bits in _BITS]
    assert all(later < earlier for earlier, later in itertools.pairwise(ordered))
  from_runs = bit_allocation.objectives_from_results(runs)
  assert list(from_runs[0]) == list(objectives)
  for path, table in objectives.items():
    for bits, value in table.items():
      assert value == pytest.approx(from_runs[0][path][bits], rel=1e-5)
  assert (costs, weights) == from_runs[1:]
  assert weights == {"Dense_0": 12 * 24, "Dense_1": 24 * 16, "Dense_2": 16 * 6}
  # Per-channel asymmetric grids: bits a weight plus a float32 scale and an int32
  # zero point per output channel.
  assert costs["Dense_1"][3] == 3 * 24 * 16 + 64 * 16


def test_rules_quantize_the_model_at_the_allocated_bits(tiny_model):
  model, variables, batches, grams, matrices, _ = tiny_model
  triple = bit_allocation.objectives_from_grams(grams, matrices, comq_jax.rtn(4), _BITS)
  allocation = bit_allocation.allocate_bits(*triple, budget=6.0)
  assert len(set(allocation.bits.values())) > 1
  solver = comq_jax.rtn(4)
  result = comq_jax.quantize_model(model, variables, batches, solver,
                                   rules=allocation.rules(solver))
  assert {report.path: report.bits for report in result.layers} == allocation.bits
  assert sum(report.error**2 for report in result.layers) == pytest.approx(
      allocation.objective, rel=1e-5)
  # The packed kernels' bytes: the packed model less the float leaves (the biases).
  biases = sum(4 * leaf["bias"].size for leaf in variables["params"].values())
  kernel_bits = 8 * (result.size_report().packed_bytes - biases)
  assert kernel_bits / allocation.weights == pytest.approx(allocation.average_bits,
                                                           rel=1e-12)
  assert allocation.average_bits <= 6.0


def _case():
  return ({"a": {2: 1.0, 4: 0.5}, "b": {2: 2.0, 4: 1.0}},
          {"a": {2: 20, 4: 40}, "b": {2: 20, 4: 40}}, {"a": 10, "b": 10})


@pytest.mark.parametrize("change, match", [
    (lambda o, c, w, k: (({}, {}, {}), k), "objectives is empty"),
    (lambda o, c, w, k: ((o, {"a": c["a"]}, w), k), r"costs must have the layers.*missing \['b'\]"),
    (lambda o, c, w, k: ((o, c, dict(w, z=3)), k), r"weights must have.*extra \['z'\]"),
    (lambda o, c, w, k: ((dict(o, a={}), c, w), k), "a: the layer has no bit width"),
    (lambda o, c, w, k: ((o, dict(c, a={2: 20}), w), k), "a: costs has bits"),
    (lambda o, c, w, k: ((dict(o, a={17: 1.0}), dict(c, a={17: 9}), w), k), "1..16"),
    (lambda o, c, w, k: ((dict(o, a={2.0: 1.0}), dict(c, a={2.0: 9}), w), k), "1..16"),
    (lambda o, c, w, k: ((dict(o, a={2: -1.0, 4: 0.0}), c, w), k), "a: objective must be"),
    (lambda o, c, w, k: ((dict(o, a={2: math.nan, 4: 0.0}), c, w), k),
     "a: objective must be a finite"),
    (lambda o, c, w, k: ((o, dict(c, b={2: math.inf, 4: 40}), w), k), "b: cost must be"),
    (lambda o, c, w, k: ((o, c, dict(w, a=0)), k), "a: weights must be a positive integer"),
    (lambda o, c, w, k: ((o, c, w), dict(k, budget=0.0)), "budget must be a finite"),
    (lambda o, c, w, k: ((o, c, w), dict(k, budget=math.inf)), "budget must be a finite"),
    (lambda o, c, w, k: ((o, c, w), dict(k, budget=1.5)),
     "below the cheapest allocation, 2 bits per weight"),
    (lambda o, c, w, k: ((o, c, w), dict(k, resolution=0)), "resolution must be an integer"),
    (lambda o, c, w, k: ((o, c, w), dict(k, resolution=2.0)), "resolution must be an integer"),
    (lambda o, c, w, k: ((o, dict(c, a={2: 21, 4: 40}), w), dict(k, budget=2.05,
                                                                resolution=2)),
     "resolution=2 is too coarse"),
])
def test_allocate_bits_rejects_bad_inputs(change, match):
  (objectives, costs, weights), options = change(*_case(), dict(budget=3.0))
  with pytest.raises(ValueError, match=match):
    bit_allocation.allocate_bits(objectives, costs, weights, **options)


def test_helpers_reject_bad_inputs(tiny_model):
  _, _, _, grams, matrices, runs = tiny_model
  solver = comq_jax.rtn(4)
  allocation = bit_allocation.allocate_bits(*_case(), budget=3.0)
  with pytest.raises(ValueError, match="solver must be built by"):
    allocation.rules("rtn")
  with pytest.raises(ValueError, match="bits must be in 2..8"):
    bit_allocation.layer_cost_bits((1, 4, 4), solver, 9)
  with pytest.raises(ValueError, match="bit_choices must be a non-empty sequence"):
    bit_allocation.objectives_from_grams(grams, matrices, solver, [])
  with pytest.raises(ValueError, match="weights_by_path is empty"):
    bit_allocation.objectives_from_grams(grams, {}, solver, _BITS)
  with pytest.raises(ValueError, match="Dense_9: no Gram"):
    bit_allocation.objectives_from_grams(grams, {"Dense_9": matrices["Dense_0"]}, solver, _BITS)
  with pytest.raises(ValueError, match="Dense_0: matrices must be"):
    bit_allocation.objectives_from_grams(grams, {"Dense_0": matrices["Dense_1"]}, solver, _BITS)
  with pytest.raises(ValueError, match="results must be a non-empty dict"):
    bit_allocation.objectives_from_results({})
  fewer = runs[4]._replace(layers=runs[4].layers[:2])
  with pytest.raises(ValueError, match="the runs must quantize the same layers"):
    bit_allocation.objectives_from_results({3: runs[3], 4: fewer})
  with pytest.raises(ValueError, match="inputs='fp'"):
    bit_allocation.objectives_from_results({4: runs[4]._replace(inputs="sequential")})
  with pytest.raises(ValueError, match="every layer must be at 3 bits"):
    bit_allocation.objectives_from_results({3: runs[4]})
  with pytest.raises(ValueError, match="integer bits"):
    bit_allocation.objectives_from_results({"4": runs[4]})
  report = LayerReport(path="Dense_0", shape=(12, 24), bits=4, error=1.0, rtn_error=1.0,
                       seconds=0.0, matrices=(1, 12, 20), solver=solver)
  other = ModelQuantization(variables=None, layers=[report], skipped=[])
  first = runs[4]._replace(layers=runs[4].layers[:1])
  with pytest.raises(ValueError, match="Dense_0: the runs give it matrices"):
    bit_allocation.objectives_from_results({4: first, 3: other._replace(
        layers=[report._replace(bits=3)])})


def _squared_error_loss(model):
  def loss_fn(params, batch):
    inputs, targets = batch
    return ((model.apply({"params": params}, inputs) - targets) ** 2).mean() / 2
  return loss_fn


def test_fisher_diagonal_is_the_mean_squared_gradient(tiny_model):
  model, variables, batches, *_ = tiny_model
  rng = np.random.default_rng(0)
  data = [(x, rng.normal(size=(x.shape[0], 6)).astype(np.float32)) for x in batches]
  loss_fn = _squared_error_loss(model)
  fisher = bit_allocation.fisher_diagonal(loss_fn, variables["params"], data,
                                          ["Dense_0", "Dense_2"])
  assert list(fisher) == ["Dense_0", "Dense_2"]
  # Reference: float64 gradients of each batch by jax.grad, squared and averaged.
  with jax.enable_x64():
    params64 = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    grads = [jax.grad(loss_fn)(params64, (np.asarray(x, np.float64), np.asarray(y, np.float64)))
             for x, y in data]
  for path in fisher:
    expected = np.mean([np.square(np.asarray(g[path]["kernel"])) for g in grads], axis=0)
    assert fisher[path].shape == variables["params"][path]["kernel"].shape
    np.testing.assert_allclose(fisher[path], expected, rtol=1e-4, atol=1e-12)
  # The last layer's gradient is X^T (XW + b - Y) / (rows * 6): the Fisher is not zero.
  assert float(np.min(np.asarray(fisher["Dense_2"]).max(axis=0))) > 0
  with pytest.raises(ValueError, match="batches is empty"):
    bit_allocation.fisher_diagonal(loss_fn, variables["params"], [], ["Dense_0"])
  with pytest.raises(ValueError, match="Dense_7: params has no kernel"):
    bit_allocation.fisher_diagonal(loss_fn, variables["params"], data, ["Dense_7"])
  with pytest.raises(ValueError, match="layer_paths is empty"):
    bit_allocation.fisher_diagonal(loss_fn, variables["params"], data, [])


def test_objectives_from_fisher_weigh_the_rounding_errors(tiny_model):
  model, variables, batches, grams, matrices, _ = tiny_model
  rng = np.random.default_rng(1)
  fisher = {path: rng.uniform(0.0, 2.0, size=mats.shape).astype(np.float32)
            for path, mats in matrices.items()}
  as_matrices = bit_allocation.fisher_matrices(
      model, variables, batches[0], {path: values[0] for path, values in fisher.items()})
  for path in fisher:
    np.testing.assert_array_equal(as_matrices[path], fisher[path])
  objectives, costs, weights = bit_allocation.objectives_from_fisher(
      fisher, matrices, comq_jax.rtn(4), _BITS)
  for path, table in objectives.items():
    for bits, value in table.items():
      rounded = comq_jax.rtn(bits).quantize_layer(matrices[path][0]).weights
      expected = 0.5 * np.sum(np.float64(fisher[path][0])
                              * np.square(np.float64(matrices[path][0]) - np.float64(rounded)))
      assert value == pytest.approx(expected, rel=1e-9)
  assert (costs, weights) == bit_allocation.objectives_from_grams(
      grams, matrices, comq_jax.rtn(4), _BITS)[1:]
  # With GPTQ the Grams are needed, and the objective follows GPTQ's weights.
  gptq = bit_allocation.objectives_from_fisher(fisher, matrices, comq_jax.gptq(4), (3,),
                                               grams=grams)[0]
  assert gptq["Dense_1"][3] != objectives["Dense_1"][3]
  with pytest.raises(ValueError, match="needs the layers' Grams"):
    bit_allocation.objectives_from_fisher(fisher, matrices, comq_jax.gptq(4), _BITS)
  with pytest.raises(ValueError, match="Dense_1: the Fisher must have the matrices' shape"):
    bit_allocation.objectives_from_fisher(dict(fisher, Dense_1=fisher["Dense_0"]), matrices,
                                          comq_jax.rtn(4), _BITS)
  with pytest.raises(ValueError, match="Dense_1: no Fisher"):
    bit_allocation.objectives_from_fisher({"Dense_0": fisher["Dense_0"]}, matrices,
                                          comq_jax.rtn(4), _BITS)
  with pytest.raises(ValueError, match="without a supported linear view"):
    bit_allocation.fisher_matrices(model, variables, batches[0], {"Dense_9": fisher["Dense_0"]})
