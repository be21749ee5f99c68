"""benchmarks/compare_torchjd.py: both libraries run every row, and agree.

The quick run needs torch and torchjd (the "compare" extra) and is skipped
without them; the message that says how to install them is checked always.
"""

import json
import math
import os
import sys

import pytest

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "benchmarks")
sys.path.insert(0, _BENCH)

import compare_torchjd  # noqa: E402

# Every aggregator both libraries have (Krum needs T >= 3: the quick T is 4).
AGGREGATORS = {"sum (one read)", "mean", "weighted (Constant)", "mgda", "pcgrad",
               "upgrad", "dualproj", "imtl_g", "aligned_mtl", "config", "nash_mtl",
               "cagrad", "fairgrad", "gradvac", "trimmed_mean", "graddrop",
               "random (RLW)", "pcd", "cr_mogm(mgda)", "excess_mtl",
               "modo (one batch)", "sdmgrad (one batch)", "krum"}

# Every Gramian weighting both libraries have, on a T x T matrix.
SOLVES = {"mgda", "pcgrad", "upgrad", "dualproj", "imtl_g", "aligned_mtl", "cagrad",
          "fairgrad", "gradvac", "pcd", "cr_mogm(mgda)", "krum"}


def test_without_torch_the_script_says_how_to_install_it(monkeypatch, capsys):
  monkeypatch.setattr(compare_torchjd, "torch", None)
  monkeypatch.setattr(compare_torchjd, "_TORCH_ERROR",
                      "ModuleNotFoundError: No module named 'torch'")
  with pytest.raises(SystemExit) as exit_info:
    compare_torchjd.main(["--quick"])
  assert exit_info.value.code == 2
  message = capsys.readouterr().err
  assert "No module named 'torch'" in message
  assert 'pip install -e ".[compare]"' in message


def _check_timings(row):
  for key in ("optax_mtl_ms", "torchjd_ms"):
    assert math.isfinite(row[key]) and row[key] > 0, row
  assert row["ratio"] == pytest.approx(row["torchjd_ms"] / row["optax_mtl_ms"])


# cvxpy warns that TorchJD's Nash-MTL problem is not DPP (a note on its
# speed); the suite turns warnings into errors.
@pytest.mark.filterwarnings("ignore:You are solving a parameterized problem that is not DPP")
def test_quick_run_times_every_row_in_both_libraries(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("torchjd")
  report = compare_torchjd.main(["--quick", "--out", str(tmp_path)])
  stem = tmp_path / "compare_torchjd_cpu_quick"
  assert json.loads(stem.with_suffix(".json").read_text()) == report
  assert stem.with_suffix(".png").stat().st_size > 0
  text = stem.with_suffix(".md").read_text()
  assert report["versions"]["torchjd"] in text and report["date"] in text
  assert f"]({stem.name}.png)" in text  # the bar chart is on the page

  (case,) = report["aggregators"]
  assert set(case["rows"]) == AGGREGATORS | {"gramian pass (J J^T)"}
  for name, row in case["rows"].items():
    _check_timings(row)
    # Where the definitions match, the two updates agree.
    if row["rtol"] is not None:
      assert row["agree"], (name, row)
  gram = case["rows"]["gramian pass (J J^T)"]
  assert 0 <= gram["optax_mtl_vs_float64"] < 1e-5 and 0 <= gram["torchjd_vs_float64"] < 1e-5
  compared = {n for n, r in case["rows"].items() if r["rtol"] is not None}
  assert {"mean", "mgda", "upgrad", "dualproj", "imtl_g", "aligned_mtl", "config",
          "nash_mtl", "cagrad", "fairgrad", "krum", "trimmed_mean"} <= compared

  (case,) = report["solves"]
  assert case["T"] == 4 and case["kind"] == "conflicting" and case["conflicting_pairs"] > 0
  assert set(case["rows"]) == SOLVES
  for name, row in case["rows"].items():
    _check_timings(row)
    if row["rtol"] is not None:
      assert row["agree"], (name, row)
  assert {"mgda", "upgrad", "dualproj", "imtl_g", "aligned_mtl", "cagrad",
          "fairgrad", "pcd"} <= {n for n, r in case["rows"].items() if r["rtol"] is not None}
  # optax_mtl's QP solutions are those of a float64 solver.
  for name in ("mgda", "upgrad", "dualproj", "cr_mogm(mgda)"):
    assert case["rows"][name]["vs_float64"]["optax_mtl"] < 1e-5, (name, case["rows"][name])

  assert {(c["kind"], c["tasks"]) for c in report["train"]} == {("mlp", 3), ("cnn", 3)}
  for case in report["train"]:
    assert list(case["rows"]) == list(compare_torchjd.TRAIN_ROWS)
    for label, row in case["rows"].items():
      _check_timings(row)
      assert min(row["rounds"].values()) >= 1, (label, row)
      # Same parameters and batch: the first step's gradients (the
      # Jacobian, the Gramian) agree.
      if label in compare_torchjd.CHECK_RTOL:
        assert row["agree"], (case["kind"], label, row)
