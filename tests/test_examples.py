"""The examples run, in small settings, so that they cannot rot."""

import importlib.util
import pathlib

import jax.numpy as jnp
import numpy as np

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
  spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_quickstart_balancing_beats_the_plain_sum():
  quickstart = load("quickstart")
  data = quickstart.load_data(0)
  ink_tr = data[4]
  txs = quickstart.methods(jnp.array([np.log(10.0), float(np.mean(ink_tr ** 2))]))
  summed_accuracy, _ = quickstart.train(txs["sum"], data, steps=300, batch=64, seed=0)
  balanced_accuracy, rmse = quickstart.train(txs["weighted 1/L(0)"], data,
                                             steps=300, batch=64, seed=0)
  # The regression loss (~1e5) drowns the classification under a plain sum;
  # weighting by the inverse initial losses lets both tasks learn.
  assert balanced_accuracy > 0.8
  assert balanced_accuracy > summed_accuracy + 0.3
  assert rmse < 0.2 * float(np.std(ink_tr)) + 30.0


def test_nnx_exact_and_representation_paths_agree_for_the_mean():
  # For mean(), pulling back the averaged feature gradient through the
  # encoder is the averaged parameter gradient: both paths train identically.
  results = load("nnx_train_step").main(steps=150, verbose=False)
  np.testing.assert_allclose(results["exact"], results["representation"], atol=0.01)
  assert min(results["exact"]) > 0.8


def test_linen_train_state_step_forwards_losses():
  first, last, step = load("linen_train_state").main(steps=150, verbose=False)
  assert step == 150
  assert np.all(last < 0.2 * first)


def test_gradient_accumulation_after_the_aggregator():
  first, last = load("gradient_accumulation").main(steps=120, accumulate=4,
                                                   verbose=False)
  assert np.all(last < 0.5 * first)


def test_checkpoint_restore_continues_identically():
  import jax
  straight, resumed = load("checkpointing").main(steps=10, verbose=False)
  assert jax.tree.structure(straight) == jax.tree.structure(resumed)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_compose_and_log_weights_follow_the_losses():
  history = load("compose_and_log").main(steps=120, verbose=False)
  losses, weights = history[-1]
  assert weights.shape == (2,)
  # Uncertainty weighting drives 1 / (2 w_t) toward L_t: the task with the
  # far larger loss gets the far smaller weight, and every loss has dropped.
  assert weights[0] > 100 * weights[1]
  assert np.all(losses < history[0][0])


def test_one_backward_example_runs(capsys):
  load("one_backward").main(["--steps", "20"])
  printed = capsys.readouterr().out
  assert printed.count("relative losses") == 4
  assert "nan" not in printed.lower()


def test_multihost_example_two_processes_match_one():
  # Two processes of 2 CPU devices each, over loopback, train exactly as one
  # process of 4 devices (the suite's) on the same global batches; there the
  # batch is sharded over the 4 devices and both tasks learn.
  import json
  import os
  import socket
  import subprocess
  import sys
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  root = EXAMPLES.parent
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  # Quicker code generation (the losses agree to float32 rounding): each
  # process compiles its step in a third of the time.
  env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""),
                               "--xla_backend_optimization_level=0",
                               "--xla_cpu_use_fusion_emitters=false"]).strip()
  args = ["--coordinator", f"localhost:{port}", "--num-processes", "2",
          "--cpu-devices", "2", "--steps", "20", "--quiet"]
  procs = [subprocess.Popen(
      [sys.executable, str(EXAMPLES / "multihost.py"), *args, "--process-id", str(i)],
      env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  try:
    outputs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, out + err
  result = json.loads(outputs[0][0].splitlines()[-1])
  assert (result["processes"], result["devices"]) == (2, 4)
  single = load("multihost").main(["--steps", "60", "--quiet"])
  assert single.shape == (60, 2) and np.all(np.isfinite(single))
  assert np.all(single[-10:].mean(0) < 0.8 * single[:10].mean(0))
  np.testing.assert_allclose(result["first"], single[0], rtol=1e-5)
  np.testing.assert_allclose(result["last"], single[19], rtol=1e-4)
