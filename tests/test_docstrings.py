"""Every docstring example runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import pytest

import optax_mtl
from optax_mtl import _src

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(_src.__path__, _src.__name__ + "."))


def _examples(module_name):
  module = importlib.import_module(module_name)
  finder = doctest.DocTestFinder(exclude_empty=True)
  return [t for t in finder.find(module, globs={"mtl": optax_mtl}) if t.examples]


WITH_EXAMPLES = [name for name in MODULES if _examples(name)]


def test_public_factories_have_examples_somewhere():
  # The examples live in the modules of the methods; a module split that
  # loses them shows up here.
  assert len(WITH_EXAMPLES) >= 15, WITH_EXAMPLES


@pytest.mark.parametrize("module_name", WITH_EXAMPLES)
def test_docstring_examples(module_name):
  runner = doctest.DocTestRunner(
      optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
  for test in _examples(module_name):
    runner.run(test)
  results = runner.summarize(verbose=False)
  assert results.attempted > 0
  assert results.failed == 0, f"{results.failed} docstring example(s) failed in {module_name}"
