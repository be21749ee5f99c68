"""multidigits --merge: rerun some methods, keep the others' earlier results."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))

import multidigits  # noqa: E402

SETTINGS = {"steps": 3000, "seeds": 3, "data_seed": 0, "quick": False}


def earlier(tmp_path, **changes):
  payload = {"settings": {**SETTINGS, "model": "MLP", **changes},
             "single_task": {"metrics": [0.98, 0.99, 220.0]},
             "results": {"sum": {"delta_m": 48.0}, "mgda": {"delta_m": 47.0}},
             "skipped": {"layerwise pcgrad": "an old error"}}
  path = tmp_path / "multidigits.json"
  path.write_text(json.dumps(payload))
  return str(path)


def test_merge_replaces_the_rerun_methods_and_keeps_the_order(tmp_path):
  results, skipped = multidigits.merge(
      earlier(tmp_path), SETTINGS, [0.98, 0.99, 220.0],
      {"layerwise pcgrad": {"delta_m": 40.0}, "sum": {"delta_m": 48.5}}, {},
      ["sum", "mgda", "layerwise pcgrad"])
  assert list(results) == ["sum", "mgda", "layerwise pcgrad"]
  assert results["sum"]["delta_m"] == 48.5 and results["mgda"]["delta_m"] == 47.0
  assert skipped == {}


@pytest.mark.parametrize("change, message", [
    ({"steps": 400}, "rerun every method"),
    (None, "single-task baselines differ"),
])
def test_merge_refuses_incomparable_runs(tmp_path, change, message):
  path = earlier(tmp_path, **(change or {}))
  stl = [0.98, 0.99, 220.0] if change else [0.5, 0.99, 220.0]
  with pytest.raises(SystemExit, match=message):
    multidigits.merge(path, SETTINGS, stl, {}, {}, ["sum"])


def test_merge_needs_an_earlier_run(tmp_path):
  with pytest.raises(SystemExit, match="run without --merge"):
    multidigits.merge(str(tmp_path / "none.json"), SETTINGS, [1.0], {}, {}, [])
