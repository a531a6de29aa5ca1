"""Solver objects carry their settings; rules choose a solver (or float) per layer."""

import dataclasses
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import comq_jax
from comq_jax import rules as rules_lib
from comq_jax import solvers
from tests.quant_core import test_packaging


def test_a_solver_is_immutable_hashable_and_carries_every_setting():
  solver = comq_jax.comq(bits=3, iters=2, scale_update=True, granularity="group",
                         group_size=16)
  assert (solver.bits, solver.iters, solver.scale_update, solver.group_size) == (3, 2, True,
                                                                                 16)
  with pytest.raises(dataclasses.FrozenInstanceError):
    solver.bits = 4
  assert hash(solver) == hash(comq_jax.comq(bits=3, iters=2, scale_update=True,
                                            granularity="group", group_size=16))
  assert solver != comq_jax.comq(bits=3)
  for built in (solver, comq_jax.gptq(bits=4, act_order=True), comq_jax.rtn(bits=2)):
    assert solvers.from_settings(built.settings()) == built


@pytest.mark.parametrize("factory, settings, message", [
    (comq_jax.comq, dict(bits=9), "bits"),
    (comq_jax.comq, dict(bits=4, iters=0), "iters"),
    (comq_jax.comq, dict(bits=4, order="random"), "order"),
    (comq_jax.comq, dict(bits=4, init="zeros"), "init"),
    (comq_jax.comq, dict(bits=4, granularity="group"), "group_size"),
    (comq_jax.rtn, dict(bits=4, group_size=32), "only for granularity='group'"),
    (comq_jax.rtn, dict(bits=4, grid="pow2", scalar=0.5), "pow2"),
    (comq_jax.gptq, dict(bits=4, damp=0.0), "damp"),
    (comq_jax.gptq, dict(bits=4, block_size=0), "block_size"),
    (comq_jax.gptq, dict(bits=4, granularity="group", group_size=8, act_order=True),
     "static_groups"),
])
def test_bad_settings_are_refused_when_the_solver_is_built(factory, settings, message):
  with pytest.raises(ValueError, match=message):
    factory(**settings)


def test_from_settings_names_an_unknown_method():
  with pytest.raises(ValueError, match="method"):
    solvers.from_settings({"bits": 4, "method": "awq"})


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16, name="attn_q")(x))
    x = nn.relu(nn.Dense(16, name="mlp_up")(x))
    return nn.Dense(4, name="head")(x)


def _net():
  model = _Net()
  batches = [jax.random.normal(jax.random.key(i), (32, 12)) for i in range(2)]
  return model, model.init(jax.random.key(9), batches[0]), batches


def test_rules_give_each_layer_its_solver_first_match_wins_and_none_keeps_float():
  model, variables, batches = _net()
  four, three = comq_jax.comq(bits=4), comq_jax.comq(bits=3)
  result = comq_jax.quantize_model(
      model, variables, batches, comq_jax.rtn(bits=8),
      rules=[("head", None), ("attn_.*", four), ("attn_q|mlp_.*", three)])
  assert [(r.path, r.solver) for r in result.layers] == [("attn_q", four),
                                                         ("mlp_up", three)]
  assert [(s.path, s.reason) for s in result.skipped] == [("head", "rule 'head'")]
  np.testing.assert_array_equal(result.variables["params"]["head"]["kernel"],
                                variables["params"]["head"]["kernel"])
  # Each layer is on its own solver's grid: at most 2^bits values per channel.
  for report in result.layers:
    kernel = np.asarray(result.variables["params"][report.path]["kernel"])
    assert max(np.unique(kernel[:, j]).size for j in range(kernel.shape[1])) <= 2**report.bits
    assert report.quantization.bits == report.bits
  # The sizes count each layer with its own bits.
  sizes = result.size_report()
  mixed = comq_jax.quantize_model(model, variables, batches, four, rules=[("head", None)])
  assert sizes.packed_bytes < mixed.size_report().packed_bytes


def test_a_pattern_must_match_the_whole_path():
  model, variables, batches = _net()
  result = comq_jax.quantize_model(model, variables, batches, comq_jax.rtn(bits=4),
                                   rules=[("attn", None)])
  assert result.skipped == []


@pytest.mark.parametrize("rules, message", [
    ("head", "sequence"),
    ([("head",)], "pair"),
    ([(3, None)], "string"),
    ([("head", {"bits": 4})], "comq_jax.comq, gptq or rtn"),
    ([("(", None)], "regular expression"),
])
def test_bad_rules_are_named(rules, message):
  model, variables, batches = _net()
  with pytest.raises(ValueError, match=message):
    comq_jax.quantize_model(model, variables, batches, comq_jax.rtn(bits=4), rules=rules)


def test_quantize_model_needs_a_solver_object():
  model, variables, batches = _net()
  with pytest.raises(ValueError, match="solver must be built by comq_jax.comq"):
    comq_jax.quantize_model(model, variables, batches, {"bits": 4})


def test_solver_for_returns_the_matching_pattern():
  checked = rules_lib.check_rules([("a/.*", None), ("a/b", comq_jax.rtn(bits=2))])
  default = comq_jax.rtn(bits=4)
  assert rules_lib.solver_for("a/b", checked, default) == (None, "a/.*")
  assert rules_lib.solver_for("c", checked, default) == (default, None)


def test_the_layer_solve_equals_the_model_solve():
  # One layer through the solver object and through quantize_model: the same codes.
  model, variables, batches = _net()
  solver = comq_jax.gptq(bits=3, granularity="group", group_size=4, static_groups=True,
                         act_order=True)
  result = comq_jax.quantize_model(model, variables, batches[:1], solver,
                                   rules=[("attn_q", solver), (".*", None)])
  direct = solver.quantize_layer(variables["params"]["attn_q"]["kernel"], batches[0])
  report = result.layers[0]
  np.testing.assert_array_equal(report.quantization.codes[0], direct.codes)
  np.testing.assert_array_equal(report.quantization.scale[0], direct.scale)
  np.testing.assert_array_equal(result.variables["params"]["attn_q"]["kernel"],
                                direct.weights)
  assert jnp.dtype(report.quantization.codes.dtype) == jnp.int32


@pytest.mark.integration
def test_each_library_loads_only_the_core_and_never_pallas():
  for library, other in (("comq_jax", "inq_jax"), ("inq_jax", "comq_jax"),
                         ("quant_core", "comq_jax")):
    check = (f"import sys, {library}\n"
             f"print({other!r} in sys.modules, 'inq_jax' in sys.modules and "
             f"{library!r} == 'quant_core', 'quant_core' in sys.modules, "
             "'jax.experimental.pallas' in sys.modules, "
             "'quant_core.deploy.kernels' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                         check=True, cwd=test_packaging.REPO).stdout.split()
    assert out == ["False", "False", "True", "False", "False"], (library, out)
