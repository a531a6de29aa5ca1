"""The libraries' docstring examples run, under the suite's strict settings."""

import doctest
import importlib
import pkgutil

import pytest

import comq_jax
import inq_jax

MODULES = sorted(
    info.name for package in (inq_jax, comq_jax)
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."))

# The modules whose docstrings hold examples, with their number of examples (counted in
# the docstrings: inq_jax.incremental.inq's walk-through and comq_jax.solvers' solver
# examples). A module that loses its examples, or gains some, must be listed here.
EXAMPLES = {"comq_jax.solvers": 6, "inq_jax.incremental": 7}


def run_examples(name):
  """Runs the docstring examples of module ``name``; fails if it has none."""
  result = doctest.testmod(importlib.import_module(name),
                           optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0, f"{name} has no docstring examples"
  assert result.failed == 0, name
  return result


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_docstring_examples_pass(name):
  assert run_examples(name).attempted == EXAMPLES[name]


def test_a_module_without_examples_fails_the_check():
  with pytest.raises(AssertionError, match="comq_jax.rules has no docstring examples"):
    run_examples("comq_jax.rules")


def test_the_listed_modules_are_all_those_with_examples():
  finder = doctest.DocTestFinder()
  counts = {name: sum(len(test.examples)
                      for test in finder.find(importlib.import_module(name)))
            for name in MODULES}
  assert set(EXAMPLES) <= set(MODULES)
  assert {name: n for name, n in counts.items() if n} == EXAMPLES
