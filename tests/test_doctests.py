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


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_pass(name):
  result = doctest.testmod(importlib.import_module(name),
                           optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, name


def test_the_inq_example_is_among_them():
  finder = doctest.DocTestFinder()
  examples = sum(len(test.examples)
                 for name in MODULES
                 for test in finder.find(importlib.import_module(name)))
  assert examples >= 6  # inq_jax.incremental.inq has six
