"""The accelerator forms, run on CPU, give what the CPU forms give.

Every backend-dependent choice (``engine/platform.py``) has a CPU form and
the form GPUs and TPUs compile: the portable Gramian and cross-matrix
contractions instead of the blocked CPU loops, vmapped projections and
backward passes instead of one after another, unrolled solver loop trips.
``platform.accelerator_forms()`` makes every choice take the accelerator
form on this CPU, so the programs an accelerator would run are checked here:
each method whose code has such a choice, on gradients with a leaf large
enough for the blocked Gramian, two steps, jitted; the two-batch methods on
distinct batches (the cross matrix); the per-task Jacobian and the lean
Gramian of a small convolutional network.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import convnets
import optax_mtl as mtl
from method_cases import CASES
from optax_mtl._src.engine import platform
from optax_mtl._src.engine import statistics

NUM_TASKS = 5
# Methods whose solver takes a backend-dependent form; each reads the
# Gramian, whose large leaves do too.
NAMES = ("mgda", "mgda_l2", "cagrad", "upgrad", "dualproj", "pcd", "nash_mtl",
         "fairgrad", "cr_mogm")
BY_NAME = {case.name: case for case in CASES}


def _grads(seed, scale=1.0):
  # "big" holds >= 4 * CPU_CHUNK * T entries: the blocked CPU Gramian, with
  # a remainder block.
  columns = 4 * statistics.CPU_CHUNK + 1000
  keys = jax.random.split(jax.random.key(seed), 3)
  shared = jax.random.normal(keys[2], (1, columns))
  return {"big": scale * (jax.random.normal(keys[0], (NUM_TASKS, columns))
                          + 0.3 * shared),
          "small": scale * jax.random.normal(keys[1], (NUM_TASKS, 7))}


def _params():
  return jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), _grads(0))


def _method_runs(names):
  losses = jnp.linspace(1.0, 2.0, NUM_TASKS)
  out = {}
  for name in names:
    tx = BY_NAME[name].make(NUM_TASKS)
    state = tx.init(_params())
    update = jax.jit(lambda g, s, tx=tx: tx.update(g, s, _params(), losses=losses))
    steps = []
    for seed in (1, 2):
      updates, state = update(_grads(seed), state)
      steps.append((updates, state.task_weights))
    out[name] = steps
  return out


def _two_batch_runs():
  out = {}
  for name, make in (("sdmgrad", mtl.sdmgrad), ("modo", mtl.modo)):
    tx = make(num_tasks=NUM_TASKS)
    state = tx.init(_params())
    update = jax.jit(lambda g1, g2, g3, s, tx=tx: tx.update(
        g1, s, _params(), second_grads=g2, third_grads=g3))
    steps = []
    for seed in (1, 4):
      updates, state = update(_grads(seed), _grads(seed + 1), _grads(seed + 2), state)
      steps.append((updates, state.task_weights))
    out[name] = steps
  return out


def _cnn_runs():
  params, x = convnets.problem()
  _, jacobian = jax.jit(mtl.value_and_jacobian(convnets.losses))(params, x)
  # chunk_size=1: one task per loop trip (the CPU form rewrites the
  # convolutions of the loop body).
  _, lean = jax.jit(mtl.value_and_gramian(convnets.losses, chunk_size=1))(params, x)
  return {"jacobian": jacobian, "lean gramian": (lean.normalized, lean.scale)}


def _everything():
  return {"methods": _method_runs(NAMES), "two batches": _two_batch_runs(),
          "cnn": _cnn_runs()}


@pytest.fixture(scope="module")
def both_forms():
  cpu = _everything()
  with platform.accelerator_forms():
    accelerator = _everything()
  return cpu, accelerator


def _close(a, b, what):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert np.all(np.isfinite(x)), what
    scale = max(float(np.max(np.abs(y), initial=0.0)), 1e-30)
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * scale, err_msg=what)


@pytest.mark.parametrize("name", NAMES)
def test_methods_match(both_forms, name):
  cpu, accelerator = both_forms
  _close(accelerator["methods"][name], cpu["methods"][name], name)


@pytest.mark.parametrize("name", ["sdmgrad", "modo"])
def test_two_batch_methods_match(both_forms, name):
  cpu, accelerator = both_forms
  _close(accelerator["two batches"][name], cpu["two batches"][name], name)


@pytest.mark.parametrize("what", ["jacobian", "lean gramian"])
def test_convolutional_paths_match(both_forms, what):
  cpu, accelerator = both_forms
  _close(accelerator["cnn"][what], cpu["cnn"][what], what)


def test_the_switch_changes_the_program():
  # The CPU forms are chosen at lowering (an index over the platforms
  # ('cpu',) and the rest in the jaxpr); inside the switch the accelerator
  # forms are traced directly: no choice, and no blocked CPU loop.
  grads = _grads(0)
  gram = lambda g: mtl.gramian(g).normalized
  choice = "platforms=(('cpu',), None)"
  assert choice in str(jax.make_jaxpr(gram)(grads))
  with platform.accelerator_forms():
    inside = str(jax.make_jaxpr(gram)(grads))
  assert choice not in inside and "while" not in inside
  assert choice in str(jax.make_jaxpr(gram)(grads))
