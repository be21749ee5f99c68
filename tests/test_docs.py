"""The documentation's sources cover the public API and show only tested code.

These tests read the sources under docs/ (no Sphinx build, so they are fast):

* every name of ``optax_mtl.__all__`` is documented by exactly one autodoc
  directive on the API pages (docs/api/*.rst), and each page's autosummary
  table lists exactly the names the page documents;
* every Python listing of the narrative pages is a ``literalinclude`` of an
  example script that tests/test_examples.py runs, and what it selects
  (``:pyobject:``, ``:start-at:``, ``:end-at:``) is still in that script;
* every public function has a docstring example that tests/test_docstrings.py
  runs;
* every recorded benchmark result (benchmarks/results/*.md and *.png) is
  shown on a page.

The docs build itself (``sphinx-build -W``, warnings as errors) runs in CI
(.ci/run), in its own environment.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import pathlib
import pkgutil
import re
import sys

import pytest

import optax_mtl
from optax_mtl import _src

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API = DOCS / "api"
EXAMPLES = ROOT / "examples"
RESULTS = ROOT / "benchmarks" / "results"

# Public functions that have no docstring example yet. Adding an example to
# one of them means removing it here (the test below fails while it is
# listed and has one).
WITHOUT_EXAMPLE = frozenset({"aggregator", "task_scaling", "initial_weights"})

_AUTODOC = re.compile(r"^\.\. auto(?:function|class|data|exception)::\s+(\S+)\s*$",
                      re.MULTILINE)


def _short(name: str) -> str:
  return name.removeprefix("optax_mtl.")


def _api_pages() -> list[pathlib.Path]:
  return sorted(p for p in API.glob("*.rst") if p.name != "index.rst")


def _documented(page: pathlib.Path) -> list[str]:
  return [_short(n) for n in _AUTODOC.findall(page.read_text())]


def _autosummary(page: pathlib.Path) -> list[str]:
  """The names listed under the page's ``.. autosummary::`` directives."""
  names, inside = [], False
  for line in page.read_text().splitlines():
    if line.startswith(".. autosummary::"):
      inside = True
      continue
    if not inside:
      continue
    stripped = line.strip()
    if not stripped or stripped.startswith(":"):
      continue
    if not line.startswith("   "):
      inside = False
      continue
    names.append(_short(stripped))
  return names


def _all_documented() -> dict[str, list[str]]:
  where: dict[str, list[str]] = {}
  for page in _api_pages():
    for name in _documented(page):
      where.setdefault(name, []).append(page.name)
  return where


def test_every_public_name_is_in_the_api_reference():
  documented = _all_documented()
  missing = sorted(set(optax_mtl.__all__) - set(documented))
  assert not missing, (
      f"public names with no autodoc entry on docs/api/*.rst: {missing}. Add "
      f"each to the page of its family (an '.. autofunction::' or "
      f"'.. autoclass::' entry and a line in the page's autosummary list).")


def test_no_name_is_documented_twice_or_is_not_public():
  documented = _all_documented()
  twice = {n: pages for n, pages in documented.items() if len(pages) > 1}
  assert not twice, f"documented more than once (Sphinx warns): {twice}"
  stale = sorted(set(documented) - set(optax_mtl.__all__))
  assert not stale, f"documented but not in optax_mtl.__all__: {stale}"


@pytest.mark.parametrize("page", _api_pages(), ids=lambda p: p.name)
def test_each_page_lists_exactly_what_it_documents(page):
  listed, documented = _autosummary(page), _documented(page)
  assert listed, f"{page.name} has no autosummary list"
  assert len(listed) == len(set(listed)), f"{page.name}: a name listed twice"
  assert set(listed) == set(documented), (
      f"{page.name}: listed but not documented {sorted(set(listed) - set(documented))}, "
      f"documented but not listed {sorted(set(documented) - set(listed))}")


def test_every_api_page_is_in_the_api_toctree():
  text = (API / "index.rst").read_text()
  entries = set(re.findall(r"^   (\w+)\s*$", text, re.MULTILINE))
  assert {p.stem for p in _api_pages()} <= entries


def _narrative_pages() -> list[pathlib.Path]:
  return sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)


def _directives(text: str, name: str) -> list[tuple[str, dict[str, str]]]:
  """(argument, options) of each MyST ```{name} block of a page."""
  found = []
  for match in re.finditer(r"^```\{" + name + r"\}\s*(\S+)\n(.*?)^```", text,
                           re.MULTILINE | re.DOTALL):
    options = dict(re.findall(r"^:([\w-]+):\s*(.*?)\s*$", match.group(2), re.MULTILINE))
    found.append((match.group(1), options))
  return found


def _unquote(value: str) -> str:
  if len(value) >= 2 and value[0] == value[-1] == '"':
    return value[1:-1].replace('\\"', '"')
  return value


def test_python_listings_are_includes_of_tested_examples():
  tested = set(re.findall(r'load\("(\w+)"\)',
                          (ROOT / "tests" / "test_examples.py").read_text()))
  includes = 0
  for page in _narrative_pages():
    text = page.read_text()
    assert not re.search(r"^```(?:python|py|\{code-block\}\s*python)\s*$", text,
                         re.MULTILINE), (
        f"{page.relative_to(ROOT)} has a hand-written Python block: include "
        f"the tested code with a literalinclude of an example instead")
    for argument, options in _directives(text, "literalinclude"):
      includes += 1
      target = (page.parent / argument).resolve()
      where = f"{page.relative_to(ROOT)} -> {argument}"
      assert target.parent == EXAMPLES and target.exists(), where
      assert target.stem in tested, f"{where}: not run by tests/test_examples.py"
      source = target.read_text()
      if "pyobject" in options:
        names = {node.name for node in ast.parse(source).body
                 if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        assert options["pyobject"] in names, f"{where}: no {options['pyobject']}"
      for key in ("start-at", "end-at", "start-after", "end-before"):
        if key in options:
          assert _unquote(options[key]) in source, f"{where}: {key} not found"
  assert includes >= 10


def _module_examples() -> set[str]:
  """Qualified names of the docstring examples tests/test_docstrings.py runs."""
  finder = doctest.DocTestFinder(exclude_empty=True)
  names = set()
  for info in pkgutil.walk_packages(_src.__path__, _src.__name__ + "."):
    module = importlib.import_module(info.name)
    names.update(t.name for t in finder.find(module) if t.examples)
  return names


def _is_generated(obj) -> bool:
  # The rule of tests/test_docstrings.py: generated aliases are functions
  # whose globals are not their module's.
  module = sys.modules.get(getattr(obj, "__module__", ""), None)
  globals_ = getattr(obj, "__globals__", None)
  return module is not None and globals_ is not None and globals_ is not vars(module)


def test_every_public_function_has_a_docstring_example_that_runs():
  finder = doctest.DocTestFinder(exclude_empty=True)
  run = _module_examples()
  without, not_run = [], []
  for name in optax_mtl.__all__:
    obj = getattr(optax_mtl, name)
    if not inspect.isfunction(obj):
      continue
    if not any(t.examples for t in finder.find(obj, name)):
      without.append(name)
    elif not _is_generated(obj) and f"{obj.__module__}.{obj.__qualname__}" not in run:
      not_run.append(name)
  assert not not_run, f"examples that tests/test_docstrings.py does not run: {not_run}"
  assert sorted(set(without) - WITHOUT_EXAMPLE) == [], (
      f"public functions without a docstring example: "
      f"{sorted(set(without) - WITHOUT_EXAMPLE)}")
  assert sorted(WITHOUT_EXAMPLE - set(without)) == [], (
      f"these have an example now; remove them from WITHOUT_EXAMPLE: "
      f"{sorted(WITHOUT_EXAMPLE - set(without))}")


def test_every_recorded_result_is_shown():
  pages = {p.stem: p.read_text() for p in (DOCS / "results").glob("*.md")}
  for table in sorted(RESULTS.glob("*.md")):
    assert table.stem in pages, f"no docs/results page for {table.name}"
    assert f"benchmarks/results/{table.name}" in pages[table.stem]
  shown = "\n".join(RESULTS.joinpath(f"{stem}.md").read_text()
                    for stem in pages if RESULTS.joinpath(f"{stem}.md").exists())
  shown += "\n".join(p.read_text() for p in _narrative_pages())
  for plot in sorted(RESULTS.glob("*.png")):
    assert plot.name in shown, f"{plot.name} is on no page"


def test_the_docs_build_output_is_ignored():
  ignore = (DOCS / ".gitignore").read_text().split()
  assert "/_build/" in ignore
