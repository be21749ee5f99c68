"""Reliability beyond one update: restarts, determinism, non-finite steps on
every gradient path.

The per-method properties (dtypes, scales, the non-finite policy of
``update``, a single compilation) are in the property matrix; here:

* every stateful method is checkpointed with Orbax mid-run, restored in a
  new Python process, and continues bit for bit; the new process also
  replays the run from the start and gets the same bits (determinism);
* the gradient paths that combine the gradients themselves (one backward,
  the representation path, the memory-lean Gramian) follow the same
  non-finite policy as ``update``.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl as mtl
from method_cases import CASES

_TESTS = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TESTS)
T = 3
STEPS_BEFORE, STEPS_AFTER = 2, 2


def _stateful(case) -> bool:
  """Whether the state holds more than the weights it logs."""
  params = {"trunk": {"w": jnp.zeros((8, 4)), "b": jnp.zeros((4,))},
            "head": jnp.zeros((4, 2))}
  state = case.make(T).init(params)
  return any(f != "task_weights" for f in getattr(state, "_fields", ("",)))


STATEFUL = [c for c in CASES if _stateful(c)]

# The run: the same inputs in both processes (seeded), the matrix's shapes.
_RUN = textwrap.dedent("""
    import jax, jax.numpy as jnp
    import optax_mtl as mtl
    from method_cases import CASES

    def params():
      return {"trunk": {"w": jnp.zeros((8, 4)), "b": jnp.zeros((4,))},
              "head": jnp.zeros((4, 2))}

    def inputs(step, num_tasks):
      p = params()
      leaves, treedef = jax.tree.flatten(p)
      keys = jax.random.split(jax.random.key(100 + step), len(leaves))
      grads = jax.tree.unflatten(treedef, [
          jax.random.normal(k, (num_tasks,) + l.shape) for k, l in zip(keys, leaves)])
      extra = {"losses": jnp.linspace(1.0, 2.0, num_tasks) / (1.0 + 0.5 * step),
               "kpis": jnp.linspace(0.3, 0.9, num_tasks)}
      return grads, extra

    def steps(tx, state, first, count, num_tasks):
      outs = []
      for step in range(first, first + count):
        grads, extra = inputs(step, num_tasks)
        out, state = tx.update(grads, state, params(), **extra)
        outs.append(out)
      return outs, state
""")

_CHILD = _RUN + textwrap.dedent("""
    import pickle, sys
    import numpy as np
    import orbax.checkpoint as ocp

    path, names, before, after, num_tasks, out_file = sys.argv[1:7]
    names = names.split(",")
    before, after, num_tasks = int(before), int(after), int(num_tasks)
    cases = {c.name: c for c in CASES}
    txs = {n: cases[n].make(num_tasks) for n in names}
    fresh = {n: txs[n].init(params()) for n in names}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh)
    restored = ocp.StandardCheckpointer().restore(path, abstract)
    result = {}
    for n in names:
      resumed, _ = steps(txs[n], restored[n], before, after, num_tasks)
      replayed, _ = steps(txs[n], fresh[n], 0, before + after, num_tasks)
      result[n] = {"resumed": jax.tree.map(np.asarray, resumed),
                   "replayed": jax.tree.map(np.asarray, replayed)}
    with open(out_file, "wb") as f:
      pickle.dump(result, f)
""")


def _namespace():
  scope = {}
  exec(compile(_RUN, "<run>", "exec"), scope)  # the child's run, verbatim
  return scope


def _same_bits(a, b, what):
  assert jax.tree.structure(a) == jax.tree.structure(b), what
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=what)


def test_every_stateful_method_restarts_in_a_new_process_bit_for_bit(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  run = _namespace()
  names = [c.name for c in STATEFUL]
  assert {"scale_by_uncertainty", "scale_by_dwa", "pcgrad", "nash_mtl",
          "gradvac", "pcd"} <= set(names)
  txs = {c.name: c.make(T) for c in STATEFUL}
  midway, expected = {}, {}
  for name, tx in txs.items():
    first, state = run["steps"](tx, tx.init(run["params"]()), 0, STEPS_BEFORE, T)
    midway[name] = state
    rest, _ = run["steps"](tx, state, STEPS_BEFORE, STEPS_AFTER, T)
    expected[name] = {"first": first, "rest": rest}
  path = tmp_path / "states"
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, midway)
  checkpointer.wait_until_finished()

  out_file = tmp_path / "child.pkl"
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [_TESTS, _ROOT, os.environ.get("PYTHONPATH", "")]), "JAX_PLATFORMS": "cpu"}
  done = subprocess.run(
      [sys.executable, "-c", _CHILD, str(path), ",".join(names),
       str(STEPS_BEFORE), str(STEPS_AFTER), str(T), str(out_file)],
      env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(out_file, "rb") as f:
    child = pickle.load(f)
  for name in names:
    _same_bits(child[name]["resumed"], expected[name]["rest"],
               f"{name}: resumed after a restart")
    _same_bits(child[name]["replayed"],
               expected[name]["first"] + expected[name]["rest"],
               f"{name}: replayed in a new process")


# --- the gradient paths under the non-finite policy ------------------------------


def _encoder_fn(p, x):
  return jnp.tanh(x @ p["w"])


def _heads_fn(h, z, y):
  return jnp.stack([jnp.mean((z @ h["a"] - y) ** 2), jnp.mean((z @ h["b"] + y) ** 2)])


def _problem():
  keys = jax.random.split(jax.random.key(0), 4)
  encoder = {"w": jax.random.normal(keys[0], (3, 4))}
  heads = {"a": jax.random.normal(keys[1], (4,)), "b": jax.random.normal(keys[2], (4,))}
  x = jax.random.normal(keys[3], (6, 3))
  return encoder, heads, x, jnp.sum(x, axis=1)


def _assert_skipped(grads, new_state, old_state):
  for leaf in jax.tree.leaves(grads):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  weights = new_state.task_weights
  np.testing.assert_array_equal(weights, np.zeros(2))
  _same_bits(new_state._replace(task_weights=old_state.task_weights), old_state,
             "the state of a skipped step")


@pytest.mark.parametrize("poison", ["input", "loss"])
@pytest.mark.parametrize("method", ["mgda", "dwa"])
def test_representation_and_lean_gramian_paths_skip_non_finite_steps(poison, method):
  encoder, heads, x, y = _problem()
  if poison == "input":
    x = x.at[0, 0].set(jnp.nan)  # every gradient of task 0 and 1 is NaN
  else:
    y = y.at[0].set(jnp.inf)  # the losses are inf
  tx = mtl.mgda(num_tasks=2) if method == "mgda" else mtl.dwa(num_tasks=2)
  state = tx.init(None)
  _, (enc_g, head_g), new_state = jax.jit(mtl.value_and_representation_grad(
      _encoder_fn, _heads_fn, tx))(state, encoder, heads, x, y)
  _assert_skipped((enc_g, head_g), new_state, state)

  def loss_fn(params, x, y):
    return _heads_fn(params["heads"], _encoder_fn(params["encoder"], x), y)
  params = {"encoder": encoder, "heads": heads}
  _, grads, new_state = jax.jit(mtl.value_and_gramian_grad(loss_fn, tx))(
      state, params, x, y)
  _assert_skipped(grads, new_state, state)


def test_one_backward_path_skips_non_finite_steps():
  tx = mtl.scale_by_uncertainty(num_tasks=2)
  params = {"w": jnp.array([1.0, -2.0])}

  def loss_fn(params, scale):
    return jnp.stack([jnp.sum(params["w"] ** 2), scale * jnp.sum(params["w"]) ** 2])
  state = tx.init(params)
  _, finite_grads, kept = mtl.value_and_weighted_grad(loss_fn, tx)(state, params, 1.0)
  assert np.any(np.asarray(finite_grads["w"]) != 0)
  assert not np.array_equal(kept.task_weights, np.zeros(2))
  _, grads, new_state = jax.jit(mtl.value_and_weighted_grad(loss_fn, tx))(
      state, params, jnp.inf)
  _assert_skipped(grads, new_state, state)
  weights, new_state = mtl.loss_weights(tx, state, jnp.array([1.0, jnp.nan]))
  np.testing.assert_array_equal(weights, np.zeros(2))
  _same_bits(new_state._replace(task_weights=state.task_weights), state,
             "loss_weights' state after a NaN loss")
