"""benchmarks/train_step.py runs every gradient path, and the paths agree where they must."""

import json
import math
import os
import sys

import jax
import numpy as np
import pytest

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "benchmarks")
sys.path.insert(0, _BENCH)

import models  # noqa: E402
import train_step  # noqa: E402

# These programs are small: compile them fast rather than well.
FAST = {"xla_backend_optimization_level": 0}


def test_quick_run_times_and_measures_every_row(tmp_path):
  report = train_step.main(["--quick", "--out", str(tmp_path)])
  text = (tmp_path / "train_step_cpu_quick.json").read_text()
  assert json.loads(text) == json.loads(json.dumps(report))
  assert text == json.dumps(json.loads(text), separators=(",", ":")) + "\n"

  (case,) = report["cases"]
  num_tasks = case["tasks"]
  rows = case["rows"]
  assert list(rows) == list(train_step.DEFAULT_ROWS)
  for label, row in rows.items():
    assert math.isfinite(row["ms"]) and row["ms"] > 0, label
    assert math.isfinite(row["time_ratio_to_LS"]) and row["time_ratio_to_LS"] > 0, label
    mem = row["memory_bytes"]
    assert mem["temp"] > 0 and mem["peak"] >= mem["temp"], label
    assert row["temp_ratio_to_LS"] > 0 and row["peak_ratio_to_LS"] > 0, label
    assert row["finite"], label
    # Same parameters and batch: every path sees the same first losses.
    np.testing.assert_allclose(row["first_losses"], rows["ls"]["first_losses"],
                               rtol=1e-5, err_msg=label)
  assert rows["ls"]["time_ratio_to_LS"] == 1.0

  weights = {label: np.asarray(row["first_task_weights"])
             for label, row in rows.items() if label != "ls"}
  np.testing.assert_allclose(weights["exact:mean"], np.full(num_tasks, 1 / num_tasks),
                             rtol=1e-6)
  np.testing.assert_allclose(weights["one-backward:dwa"], np.ones(num_tasks))  # DWA's warm-up
  mgda = weights["exact:mgda"]
  assert mgda.min() >= 0 and abs(mgda.sum() - 1) < 1e-5  # a convex combination
  # The lean path computes the stacked path's Gramian without stacking.
  np.testing.assert_allclose(weights["lean:upgrad"], weights["exact:upgrad"],
                             rtol=1e-4, atol=1e-6)
  assert case["agreement"]["exact:upgrad vs lean:upgrad"] < 1e-5

  # The stacked path holds T gradients, the one-backward path none.
  temp = {label: row["memory_bytes"]["temp"] for label, row in rows.items()}
  assert temp["exact:upgrad"] - temp["one-backward:dwa"] >= num_tasks * case["params"] * 4
  assert rows["one-backward:dwa"]["temp_ratio_to_LS"] < 1.1

  md = (tmp_path / "train_step_cpu_quick.md").read_text()
  assert report["device"] in md and report["date"] in md
  assert "not measured yet" in md
  for label in rows:
    assert f"| {num_tasks} | {case['params']:,} | {label} |" in md


def test_exact_and_lean_paths_give_the_same_gradients_and_state():
  num_tasks = 3
  size = train_step.SIZES["quick"]
  model = train_step.Model(
      "cnn", models.cnn_init(jax.random.key(1), num_tasks, 3, size.widths),
      models.cnn_features)
  x, y = train_step.make_batches(size, num_tasks, seed=2)[0]
  out = []
  for label in ("exact:mgda", "lean:mgda", "ls"):
    grads_fn, init = train_step.gradient_fn(label, model, num_tasks)
    args = (init(model.params), model.params, x, y)
    out.append(jax.jit(grads_fn).lower(*args).compile(FAST)(*args))
  (l1, g1, s1), (l2, g2, s2), (_, g_sum, _) = out
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  assert jax.tree.structure(g1) == jax.tree.structure(model.params)
  for a, b in zip(jax.tree.leaves((g1, s1)), jax.tree.leaves((g2, s2))):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  # The heads are not balanced: head t gets task t's own gradient, as with
  # the summed loss; the trunk gets the min-norm combination instead.
  for a, b in zip(jax.tree.leaves(g1["heads"]), jax.tree.leaves(g_sum["heads"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert not np.allclose(g1["trunk"][0]["w"], g_sum["trunk"][0]["w"])


def test_rows_and_models_reject_mistakes():
  with pytest.raises(ValueError, match="unknown path"):
    train_step.parse_row("stacked:mgda")
  with pytest.raises(ValueError, match="unknown method"):
    train_step.parse_row("exact:sgd")
  with pytest.raises(SystemExit):
    train_step.main(["--quick", "--tasks", "1"])
  with pytest.raises(ValueError, match="positive int"):
    models.cnn_init(jax.random.key(0), 0)
  params = models.cnn_init(jax.random.key(0), 2, widths=(4,))
  with pytest.raises(ValueError, match="NHWC"):
    models.cnn_features(params["trunk"], np.zeros((2, 8, 8, 1), np.float32))
  # The documented sizes: 4.7M (eight layers) and 11.0M (ResNet-18's 17).
  assert models.num_params(models.cnn_init(0, 10)["trunk"]) == 4_685_376
  assert models.num_params(models.cnn_init(
      0, 10, widths=models.RESNET18_WIDTHS)["trunk"]) == 10_991_104
