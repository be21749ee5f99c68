"""benchmarks/convolutions.py times the kernel's convolutions against XLA's, and both agree."""

import json
import math
import os
import sys

import pytest

from compiler import needs_kernel

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "benchmarks")
sys.path.insert(0, _BENCH)

import convolutions  # noqa: E402


def test_layers_follow_the_cnn_strides_and_same_padding():
  size = convolutions.SIZES["medium"]
  layers = convolutions.layers(size)
  assert [layer.c_out for layer in layers] == list(size.widths)
  assert [layer.stride for layer in layers] == [1, 1, 2, 1, 2, 1, 2, 1]
  assert [layer.size for layer in layers] == [32, 32, 32, 16, 16, 8, 8, 4]
  # XLA's 'SAME' for 3x3: (1, 1) at stride 1, (0, 1) at stride 2 on even sizes.
  assert layers[0].padding == ((1, 1), (1, 1))
  assert layers[2].padding == ((0, 1), (0, 1))
  assert convolutions.Layer(5, 1, 1, 2).padding == ((1, 1), (1, 1))


@needs_kernel
def test_quick_run_times_every_row_and_the_forms_agree(tmp_path):
  report = convolutions.main(["--quick", "--out", str(tmp_path)])
  text = (tmp_path / "convolutions_cpu_quick.json").read_text()
  assert json.loads(text) == json.loads(json.dumps(report))
  size = convolutions.SIZES["quick"]
  assert len(report["layers"]) == 3 * len(size.widths)
  for row in report["layers"] + [report["jacobian"]]:
    assert row["kernel_ms"] > 0 and row["xla_ms"] > 0, row
    assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
    assert row["relative_difference"] < 1e-5, row
  jacobian = report["jacobian"]
  assert 0 <= jacobian["kernel_error"] < 1e-5 and 0 <= jacobian["xla_error"] < 1e-3
  assert set(report["totals"]) == {"forward", "input gradient", "kernel gradient"}
  assert report["kernel_lanes"] in (4, 8, 16)
  markdown = (tmp_path / "convolutions_cpu_quick.md").read_text()
  assert "| 8x8, 3 -> 4, stride 1 | forward |" in markdown
  assert "## Per-task Jacobian of the whole CNN" in markdown


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--tasks", "0"],
                                  ["--quick", "--size", "full"]])
def test_bad_settings_are_refused(argv, capsys):
  with pytest.raises(SystemExit):
    convolutions.main(argv)
  assert "error:" in capsys.readouterr().err
