"""The quality benchmarks run end to end and their numbers make sense.

Each benchmark runs in-process in a tiny setting. Every registered method
traces one update; the toy problem runs one method of each kind (compiling
one costs about a second); the two network
benchmarks run the equal-weight baseline and their static reference weights,
where the expected ordering is known.
"""

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

import gradnorm_synthetic  # noqa: E402
import methods as methods_lib  # noqa: E402
import multidigits  # noqa: E402
import toy_pareto  # noqa: E402


def _load(out, stem):
  with open(os.path.join(out, stem + ".json")) as f:
    payload = json.load(f)
  for ext in (".md", ".png"):
    assert os.path.getsize(os.path.join(out, stem + ext)) > 0
  return payload


def test_registry_labels_and_selection():
  labels = [m.label for m in methods_lib.METHODS]
  assert len(labels) == len(set(labels))
  assert "mean" in labels and "sum" in labels
  assert [m.label for m in methods_lib.select(methods_lib.METHODS, "mean,sum")] == ["mean", "sum"]
  with pytest.raises(ValueError, match="Unknown method"):
    methods_lib.select(methods_lib.METHODS, "mean,no_such_method")


def test_pareto_set_matches_published_value_and_distances():
  curve = toy_pareto.pareto_set()
  # Published: x2 = -8.3552 (at x1 = 0); the ends are lower.
  np.testing.assert_allclose(curve[len(curve) // 2], [0.0, -8.3552], atol=2e-4)
  assert curve[0, 1] < curve[len(curve) // 2, 1]
  d = toy_pareto.pareto_distance(np.array([[0.0, curve[len(curve) // 2, 1]],
                                           [10.0, curve[-1, 1]],
                                           [np.nan, 0.0]]))
  np.testing.assert_allclose(d[:2], [0.0, 3.0], atol=1e-6)
  assert np.isnan(d[2])


def test_toy_mean_reaches_its_closed_form_pareto_point(tmp_path):
  out = str(tmp_path)
  toy_pareto.run(["--methods", "mean", "--out", out, "--no-progress"])
  res = _load(out, "toy_pareto")["results"]["mean"]
  # mean minimises (0.1 L1 + L2) / 2: weight 1/11 on L1, so on the Pareto set
  # x1 = 7 (2/11 - 1) = -5.727 (see toy_pareto's docstring).
  by_start = {tuple(s["start"]): s for s in res["starts"]}
  for start in [(-7.5, -0.5), (9.0, -1.0), (0.0, 0.0)]:
    s = by_start[start]
    assert s["reached"], s
    assert s["distance"] < 0.01
    assert abs(s["final"][0] - 7 * (2 / 11 - 1)) < 0.02, s
  # From (9, 9) equal weights stall on the plateau of the upper half-plane.
  assert not by_start[(9.0, 9.0)]["reached"]
  assert by_start[(9.0, 9.0)]["final"][1] > 0


def test_every_benchmark_entry_traces_an_update():
  # Tracing (no compilation) checks every entry's factory, state and update
  # signature; the end-to-end run below compiles a few of them.
  import jax
  import jax.numpy as jnp
  import optax
  params = {"w": jnp.zeros((4,)), "b": jnp.zeros(())}
  grads = jax.tree.map(lambda p: jnp.ones((3,) + p.shape), params)
  losses = jnp.array([1.0, 2.0, 3.0])
  for method in methods_lib.METHODS:
    tx = optax.chain(method.make(3), optax.adam(1e-3))
    state = tx.init(params)
    extra = {"kpis": jnp.array([0.5, 0.6, 0.7])} if method.needs_kpis else {}
    updates, _ = jax.eval_shape(
        lambda g, s: tx.update(g, s, params, losses=losses, **extra), grads, state)
    assert jax.tree.map(lambda u: u.shape, updates) == jax.tree.map(
        lambda p: p.shape, params), method.label


# One method of each kind (fixed, loss-based, learned, gradient-norm, Gramian
# solver, coordinate-wise, composite): compiling all of them costs a minute.
_TOY_SAMPLE = ("mean", "dwa", "uncertainty", "gradnorm", "mgda", "upgrad",
               "nash-mtl", "trimmed mean", "log-mgda")


def test_toy_sample_of_methods_runs(tmp_path):
  out = str(tmp_path)
  payload = toy_pareto.run(["--quick", "--steps", "300", "--out", out,
                            "--methods", ",".join(_TOY_SAMPLE), "--no-progress"])
  saved = _load(out, "toy_pareto_quick")
  assert saved["settings"]["steps"] == 300
  assert set(saved["results"]) | set(saved["skipped"]) == set(_TOY_SAMPLE)
  assert "mgda" in saved["results"] and "upgrad" in saved["results"]
  traj_steps = saved["settings"]["trajectory_steps"]
  for label, r in saved["results"].items():
    assert len(r["starts"]) == 5
    for s in r["starts"]:
      assert s["distance"] is not None and math.isfinite(s["distance"]), label
    # An Adam step moves a coordinate by at most lr (1 - b1) / sqrt(1 - b2)
    # = 3.16e-3, so 300 steps stay within 0.95 of the start.
    first = np.array([s["start"] for s in r["starts"]])
    last = np.array([s["final"] for s in r["starts"]])
    assert np.all(np.abs(last - first) < 0.95), label
    assert np.any(np.abs(last - first) > 0.05), label
    # The file keeps a few points of each trajectory (to 0.01), start to end.
    traj = np.array(r["trajectories"], dtype=np.float64)
    assert traj.shape == (5, len(traj_steps), 2), label
    np.testing.assert_allclose(traj[:, 0], first, atol=5e-3)
    np.testing.assert_allclose(traj[:, -1], last, atol=5e-3)
  assert traj_steps[0] == 0 and traj_steps[-1] == 300
  assert traj_steps == sorted(traj_steps) and len(traj_steps) <= toy_pareto.JSON_POINTS
  # Compact JSON: one line, no indentation.
  assert (tmp_path / "toy_pareto_quick.json").read_text().count("\n") == 1
  assert payload["device"]["backend"] == "cpu"


def test_gradnorm_synthetic_static_weights_beat_sum(tmp_path):
  out = str(tmp_path)
  gradnorm_synthetic.run(["--quick", "--steps", "120", "--seeds", "2",
                          "--methods", "sum,static 1/sigma^2,uncertainty",
                          "--out", out, "--no-progress"])
  saved = _load(out, "gradnorm_synthetic_quick")
  res = saved["results"]
  assert set(res) == {"sum", "static 1/sigma^2", "uncertainty"}
  # A method that logs task_weights has them recorded, normalised to sum T.
  learned = res.pop("uncertainty")
  assert learned["has_task_weights"]
  curve = np.asarray(learned["weights_mean"])
  np.testing.assert_allclose(curve.sum(axis=1), 2.0, rtol=1e-5)
  assert np.ptp(curve[:, 0]) > 0  # learned weights move
  for r in res.values():
    assert all(math.isfinite(v) for v in r["test_loss_over_sigma2"])
    assert math.isclose(r["sum"], sum(r["test_loss_over_sigma2"]), rel_tol=1e-6)
    assert len(r["curve_mean"]) == 120 // saved["settings"]["record_every"]
  # mtl.sum() built without num_tasks logs nothing; the fixed weights log
  # themselves (1/sigma^2, normalised to sum T).
  assert not res["sum"]["has_task_weights"]
  np.testing.assert_allclose(np.array(res["sum"]["weights_mean"]), 1.0)
  static = res["static 1/sigma^2"]
  assert static["has_task_weights"]
  np.testing.assert_allclose(np.array(static["weights_mean"])[-1],
                             np.array([1.0, 1e-4]) * 2 / (1 + 1e-4), rtol=1e-5)
  # sigma = (1, 100): with equal weights task 1's gradient is 10^4 times too
  # light; with weights 1/sigma^2 it learns much faster.
  static = res["static 1/sigma^2"]["test_loss_over_sigma2"][0]
  assert static < 0.85 * res["sum"]["test_loss_over_sigma2"][0]
  # The trunk's conflict along every trajectory: a cosine in [-1, 1] and a
  # norm ratio >= 1 at evenly spaced steps, with medians over every step.
  res["uncertainty"] = learned
  for label, r in res.items():
    c = r["conflict"]
    assert c["steps"][0] == 0 and c["steps"][-1] < 120, label
    assert 0 < len(c["steps"]) <= gradnorm_synthetic.CONFLICT_POINTS
    assert list(c["cosines"]) == ["1-2"]
    assert len(c["cosines"]["1-2"]) == len(c["norm_ratio"]) == len(c["steps"])
    assert all(-1.0 <= v <= 1.0 for v in c["cosines"]["1-2"]), label
    assert all(math.isfinite(v) and v >= 1.0 for v in c["norm_ratio"]), label
    assert -1.0 <= c["median_cosine"]["1-2"] <= 1.0
    assert 0.0 <= c["conflict_fraction"]["1-2"] <= 1.0
    assert c["median_norm_ratio"] >= 1.0 and c["median_norm_ratio_last_tenth"] >= 1.0
  # Step 0 reads the same initial gradients whatever the method; task 2's
  # targets are 100 times task 1's, and so is its residual at the start: its
  # trunk gradient is tens of times larger.
  first = {label: (r["conflict"]["cosines"]["1-2"][0], r["conflict"]["norm_ratio"][0])
           for label, r in res.items()}
  np.testing.assert_allclose(list(first.values()), [first["sum"]] * 3, rtol=1e-3)
  assert 10 < first["sum"][1] < 1e3
  markdown = (tmp_path / "gradnorm_synthetic_quick.md").read_text()
  assert "## Conflict between the tasks' trunk gradients" in markdown
  assert os.path.getsize(os.path.join(out, "gradnorm_synthetic_quick_conflict.png")) > 0
  assert (tmp_path / "gradnorm_synthetic_quick.json").read_text().count("\n") == 1


def test_multidigits_delta_m_formula():
  # Accuracies 0.9 and 0.8 against 1.0 (higher is better), RMSE 110 against
  # 100 (lower is better): (10% + 20% + 10%) / 3.
  got = multidigits.delta_m(np.array([0.9, 0.8, 110.0]), np.array([1.0, 1.0, 100.0]))
  assert got == pytest.approx(40.0 / 3)


def test_multidigits_runs_and_reports_delta_m(tmp_path):
  out = str(tmp_path)
  multidigits.run(["--quick", "--steps", "200", "--seeds", "2", "--methods",
                   "mean,static 1/E[L0]", "--out", out, "--no-progress"])
  saved = _load(out, "multidigits_quick")
  stl = np.array(saved["single_task"]["metrics"])
  assert np.all((stl[:2] > 0.5) & (stl[:2] <= 1.0))  # digits are easy
  assert stl[2] > 0
  for label, r in saved["results"].items():
    metrics = np.array(r["per_seed_metrics"])
    assert metrics.shape == (2, 3) and np.all(np.isfinite(metrics)), label
    np.testing.assert_allclose(r["per_seed_delta_m"],
                               multidigits.delta_m(metrics, stl), rtol=1e-6)
  # The trunk's task gradients along each trajectory: three pairwise cosines
  # in [-1, 1] and a norm ratio >= 1, every RECORD_EVERY steps. Equal weights
  # leave the squared error's gradient far larger than the others.
  res = saved["results"]
  for label, r in res.items():
    conflict = r["conflict"]
    assert conflict["steps"] == list(range(0, 200, multidigits.RECORD_EVERY))
    assert set(conflict["cosines"]) == {"left-right", "left-sum", "right-sum"}
    for curve in conflict["cosines"].values():
      assert len(curve) == len(conflict["steps"])
      assert all(-1.0 <= v <= 1.0 for v in curve), label
    assert all(v >= 1.0 for v in conflict["norm_ratio"]), label
  assert res["mean"]["conflict"]["norm_ratio"][0] > 100
  assert os.path.getsize(os.path.join(out, "multidigits_quick_conflict.png")) > 0
  # Equal weights let the squared error (~10^6) swamp the classification
  # losses (~2); weights 1/E[L0] put them back on one scale.
  assert res["static 1/E[L0]"]["metrics"][0] > res["mean"]["metrics"][0] + 0.2
  assert res["static 1/E[L0]"]["delta_m"] < res["mean"]["delta_m"]


def test_aggregator_timings_report_ratios_to_one_read(tmp_path):
  import aggregators
  aggregators.main(["--quick", "--out", str(tmp_path),
                    "--methods", "upgrad,trimmed_mean,nash_mtl"])
  (path,) = tmp_path.glob("aggregators_*_quick.json")
  assert path.name == f"aggregators_{jax.devices()[0].platform}_quick.json"
  saved = json.loads(path.read_text())
  assert [(c["T"], c["d"]) for c in saved["cases"]] == aggregators.QUICK_CASES
  for case in saved["cases"]:
    assert case["ratio_to_one_read"]["sum (one read)"] == 1.0
    assert all(math.isfinite(v) and v > 0 for v in case["ms"].values())
    # Each scaling + aggregator pair is timed fused (mtl.chain) and chained
    # (optax.chain), beside the aggregator alone, with both ratios reported.
    ratios = case["chain_ratio_to_aggregator"]
    assert set(ratios) == {pair for pair, *_ in aggregators.CHAIN_PAIRS}
    for pair, alone, fused, chained in aggregators.CHAIN_PAIRS:
      assert {alone, fused, chained} <= set(case["ms"])
      assert ratios[pair]["aggregator"] == alone
      for key, row in (("mtl.chain", fused), ("optax.chain", chained)):
        ratio = ratios[pair][key]
        assert math.isfinite(ratio) and ratio > 0, (pair, key)
        assert math.isclose(ratio, case["ms"][row] / case["ms"][alone], rel_tol=1e-9)
      # The fused chain accesses no more memory than the aggregator alone;
      # optax.chain reads the gradients again for the scaled copy.
      reads = case["bytes_accessed_per_gradient_bytes"]
      assert reads[fused] <= reads[alone] * 1.01 < reads[chained], (pair, reads)
  assert {"normalize + mgda", "realtime + pcgrad"} <= {
      pair for pair, *_ in aggregators.CHAIN_PAIRS}
  # Each Gramian method's T x T solve alone (the coordinate-wise trimmed
  # mean has none).
  assert set(saved["solves_ms"]) == {"T=3 mild", "T=3 conflicting"}
  for solves in saved["solves_ms"].values():
    assert set(solves) == {"mgda", "pcgrad", "upgrad", "nash_mtl"}
    assert all(math.isfinite(v) and v > 0 for v in solves.values())
  assert saved["gramian_pass"]["ratio"] > 0
  markdown = path.with_suffix(".md").read_text()
  assert markdown.startswith("# Aggregator time per call")
  assert "## Chain overhead" in markdown
  assert "normalize + mgda (mtl.chain)" in markdown


def test_one_backward_timings_compare_with_summed_loss(tmp_path):
  import one_backward
  out = tmp_path / "one_backward"
  one_backward.main(["--tasks", "3", "--batch", "8", "--in-dim", "8", "--hidden",
                     "16", "--depth", "1", "--iters", "1", "--repeats", "2",
                     "--methods", "realtime,dwa", "--out", str(out)])
  saved = json.loads(out.with_suffix(".json").read_text())
  rows = {r["method"]: r for r in saved["results"]}
  assert set(rows) == {"realtime", "dwa"}
  assert "stacked" in rows["realtime"]["ms"] and "stacked" not in rows["dwa"]["ms"]
  for row in rows.values():
    assert all(math.isfinite(v) and v > 0 for v in row["ratio_to_LS"].values())


def test_lean_gramian_benchmark_reports_time_and_memory(tmp_path):
  import lean_gramian
  out = tmp_path / "lean"
  lean_gramian.main(["--quick", "--out", str(out)])
  saved = json.loads(out.with_suffix(".json").read_text())
  for row in saved["results"]:
    assert set(row["ms"]) == {"LS", "stacked", "lean", "lean-all"}
    assert row["time_ratio_to_LS"]["LS"] == 1.0
    # Memory is deterministic (the compiled program's analysis): the lean
    # path holds no T gradient copies.
    peak = {k: v["peak"] for k, v in row["memory_bytes"].items()}
    assert peak["lean"] < peak["stacked"]
    assert peak["lean-all"] < peak["stacked"]
