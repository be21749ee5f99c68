"""The property matrix: every registered method against the same invariants."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import optax_mtl as mtl
from method_cases import CASES

IDS = [case.name for case in CASES]
STEPS = 3


def make_params(dtype=jnp.float32):
  return {
      "trunk": {"w": jnp.zeros((8, 4), dtype), "b": jnp.zeros((4,), dtype)},
      "head": jnp.zeros((4, 2), dtype),
  }


def random_grads(num_tasks, seed=0, dtype=jnp.float32, scale=1.0):
  params = make_params()
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  stacked = [scale * jax.random.normal(k, (num_tasks,) + l.shape)
             for k, l in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, [s.astype(dtype) for s in stacked])


def extra_args(num_tasks, step=0):
  # Positive losses that change over steps, KPIs in (0, 1].
  losses = jnp.linspace(1.0, 2.0, num_tasks) / (1.0 + 0.5 * step)
  kpis = jnp.linspace(0.3, 0.9, num_tasks)
  return {"losses": losses, "kpis": kpis}


def run(tx, grads_per_step, params, num_tasks):
  state = tx.init(params)
  outputs = []
  for step, grads in enumerate(grads_per_step):
    out, state = tx.update(grads, state, params, **extra_args(num_tasks, step))
    outputs.append(out)
  return outputs, state


def expected_shapes(case, params, task_grads):
  reference = params if case.kind == "aggregator" else task_grads
  return jax.tree.map(lambda x: (x.shape, x.dtype), reference)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_output_shapes_and_dtypes(case, dtype):
  num_tasks = 3
  params = make_params(dtype)
  grads = random_grads(num_tasks, dtype=dtype)
  (out,), _ = run(case.make(num_tasks), [grads], params, num_tasks)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), out) == expected_shapes(
      case, params, grads)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jit_matches_eager_and_chains_with_optax(case):
  num_tasks = 3
  params = make_params()
  tx = case.make(num_tasks)
  grads = [random_grads(num_tasks, seed=s) for s in range(STEPS)]
  eager, eager_state = run(tx, grads, params, num_tasks)

  # One compiled train step: the method, then (after the sum for a task
  # scaling) Adam, applied to the parameters.
  tail = optax.adam(1e-2) if case.kind == "aggregator" else optax.chain(
      mtl.sum(), optax.adam(1e-2))

  @jax.jit
  def step(params, state, tail_state, g, extras):
    out, state = tx.update(g, state, params, **extras)
    updates, tail_state = tail.update(out, tail_state, params)
    return optax.apply_updates(params, updates), state, tail_state, out

  state, tail_state, moved = tx.init(params), tail.init(params), params
  for s, (g, ref) in enumerate(zip(grads, eager)):
    moved, state, tail_state, out = step(moved, state, tail_state, g,
                                         extra_args(num_tasks, s))
    chex_close(out, ref)
  chex_close(state, eager_state)
  # The state tx.init returns has the types of the one update returns: the
  # train step compiles once, not again at the second step.
  assert step._cache_size() == 1, "the train step was compiled more than once"
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(moved))
  assert any(np.any(x != 0) for x in jax.tree.leaves(moved))


def chex_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype.kind in "fc" or x.dtype.name == "bfloat16":
      np.testing.assert_allclose(x.astype(np.float64), y.astype(np.float64),
                                 rtol=rtol, atol=atol)
    else:
      np.testing.assert_array_equal(x, y)


def degenerate_inputs():
  base = random_grads(1, seed=7)
  tile = lambda tree, signs: jax.tree.map(
      lambda g: jnp.concatenate([s * g for s in signs]), tree)
  return {
      "zero": (3, jax.tree.map(jnp.zeros_like, random_grads(3))),
      "identical": (3, tile(base, [1.0, 1.0, 1.0])),
      "opposite": (2, tile(base, [1.0, -1.0])),
      "one_task": (1, base),
      "tiny": (3, random_grads(3, scale=1e-20)),
      "huge": (3, random_grads(3, scale=1e20)),
      "mixed_scales": (2, jax.tree.map(
          lambda a, b: jnp.concatenate([1e-20 * a, 1e20 * b]),
          random_grads(1, seed=1), random_grads(1, seed=2))),
      "bfloat16": (3, random_grads(3, dtype=jnp.bfloat16)),
  }


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("kind", list(degenerate_inputs()))
def test_finite_on_degenerate_inputs(case, kind):
  num_tasks, grads = degenerate_inputs()[kind]
  if num_tasks < case.min_tasks:
    pytest.skip(f"{case.name} needs at least {case.min_tasks} tasks")
  params = make_params()
  # Two steps: the second runs on the state the first one left.
  outs, state = run(case.make(num_tasks), [grads] * 2, params, num_tasks)
  for leaf in jax.tree.leaves((outs, state)):
    leaf = np.asarray(leaf)
    if leaf.dtype.kind == "f" or leaf.dtype.name == "bfloat16":
      assert np.all(np.isfinite(leaf.astype(np.float64))), (kind, leaf)


# Methods drawing random numbers leaf by leaf: another leaf, even an empty
# one, changes the keys of the others.
DRAWS_PER_LEAF = {"graddrop"}


def _with_empty_leaf(tree, shape):
  return {**tree, "trunk": {**tree["trunk"], "empty": jnp.zeros(shape, jnp.float32)}}


def _contraction_precisions(jaxpr):
  """The precision of every dot_general in ``jaxpr`` and its sub-jaxprs."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(eqn.params["precision"])
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _contraction_precisions(sub)
  return found


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_contraction_is_at_float32_precision(case):
  # At the default precision GPUs compute float32 products in TF32 and TPUs
  # in one bfloat16 pass; the Gramian, the combination and every rule's
  # T x T products (solvers included) ask for the highest.
  num_tasks = 4
  params = make_params()
  tx = case.make(num_tasks)
  jaxpr = jax.make_jaxpr(lambda g, s: tx.update(g, s, params, **extra_args(num_tasks)))(
      random_grads(num_tasks), tx.init(params))
  precisions = _contraction_precisions(jaxpr.jaxpr)
  assert all(p == (jax.lax.Precision.HIGHEST,) * 2 for p in precisions), precisions


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_zero_size_leaf_changes_nothing(case):
  # A parameter with no entries (an empty bias) gets an empty update, and
  # the other leaves the update they get without it.
  num_tasks = 3
  params = make_params()
  grads = [random_grads(num_tasks, seed=s) for s in (0, 1)]
  want, _ = run(case.make(num_tasks), grads, params, num_tasks)
  got, _ = run(case.make(num_tasks), [_with_empty_leaf(g, (num_tasks, 0)) for g in grads],
               _with_empty_leaf(params, (0,)), num_tasks)
  for a, b in zip(want, got):
    empty = b["trunk"].pop("empty")
    assert empty.shape == ((0,) if case.kind == "aggregator" else (num_tasks, 0))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      if case.name in DRAWS_PER_LEAF:
        assert y.shape == x.shape and np.all(np.isfinite(np.asarray(y)))
      else:
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_is_stable_pytree_of_arrays(case):
  num_tasks = 3
  params = make_params()
  tx = case.make(num_tasks)
  state = tx.init(params)
  signature = lambda s: (jax.tree.structure(s), [
      (np.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(s)])
  first = signature(state)
  for step in range(STEPS):
    _, state = tx.update(random_grads(num_tasks, seed=step), state, params,
                         **extra_args(num_tasks, step))
    assert signature(state) == first
  for leaf in jax.tree.leaves(state):
    assert isinstance(leaf, (jax.Array, np.ndarray)), type(leaf)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unknown_extra_arguments_are_ignored(case):
  num_tasks = 3
  params = make_params()
  tx = case.make(num_tasks)
  grads = random_grads(num_tasks)
  state = tx.init(params)
  plain, _ = tx.update(grads, state, params, **extra_args(num_tasks))
  noisy, _ = tx.update(grads, state, params, step_name="x", batch_stats=3,
                       **extra_args(num_tasks))
  chex_close(plain, noisy)


# --- the errors of the per-task gradient contract --------------------------


def _update(case, grads, num_tasks=3, **overrides):
  params = make_params()
  tx = case.make(num_tasks)
  kwargs = {**extra_args(num_tasks), **overrides}
  return tx.update(grads, tx.init(params), params, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_error_leaf_without_task_axis(case):
  grads = random_grads(3)
  grads["trunk"]["b"] = jnp.zeros((4,))  # the parameter shape, no task axis
  with pytest.raises(ValueError, match=r"\['trunk'\]\['b'\].*leading axis 4"):
    _update(case, grads)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_error_scalar_leaf(case):
  grads = random_grads(3)
  grads["trunk"]["b"] = jnp.zeros(())
  with pytest.raises(ValueError, match=r"\['trunk'\]\['b'\].*scalar"):
    _update(case, grads)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_error_leaves_disagree_on_task_count(case):
  grads = random_grads(3)
  grads["head"] = jnp.zeros((2, 4, 2))
  with pytest.raises(ValueError, match=r"\['head'\].*leading axis 2.*has 3.*same leading task axis"):
    _update(case, grads)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_error_losses_of_wrong_length(case):
  # Leaves agree with each other; losses name a different T.
  with pytest.raises(ValueError, match=r"leading axis 3.*losses has 4 entries"):
    _update(case, random_grads(3), losses=jnp.ones(4))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_error_integer_leaf(case):
  grads = random_grads(3)
  grads["trunk"]["w"] = jnp.zeros((3, 8, 4), jnp.int32)
  with pytest.raises(ValueError, match=r"\['trunk'\]\['w'\].*int32.*floating point"):
    _update(case, grads)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_error_losses_not_a_vector(case):
  with pytest.raises(ValueError, match=r"losses must be a vector of shape \(T,\)"):
    _update(case, random_grads(3), losses=jnp.ones((3, 1)))


@pytest.mark.parametrize("case", [c for c in CASES if "losses" in c.needs],
                         ids=[c.name for c in CASES if "losses" in c.needs])
def test_error_missing_losses(case):
  with pytest.raises(TypeError, match=r"needs the per-task losses.*losses="):
    _update(case, random_grads(3), losses=None)


# --- shared mask --------------------------------------------------------------

AGGREGATORS = [c for c in CASES if c.kind == "aggregator"]
# Aliases scale every leaf, heads included, before summing: their heads are
# checked against optax.chain(scaling, sum) in test_core.py.
PURE_AGGREGATORS = [c for c in AGGREGATORS if len(c.make(3).parts[0].members) == 1]


@pytest.mark.parametrize("case", PURE_AGGREGATORS, ids=[c.name for c in PURE_AGGREGATORS])
@pytest.mark.parametrize("as_callable", [False, True])
def test_heads_are_summed_over_tasks(case, as_callable):
  num_tasks = 3
  params = make_params()
  mask = {"trunk": True, "head": False}  # a prefix of the parameter tree
  masked = case.make(num_tasks, shared=(lambda p: mask) if as_callable else mask)
  grads = random_grads(num_tasks)
  out, _ = masked.update(grads, masked.init(params), params, **extra_args(num_tasks))
  np.testing.assert_allclose(out["head"], grads["head"].sum(0), rtol=1e-6)
  # The shared leaves do not depend on the heads' gradients.
  other = dict(grads, head=10.0 * grads["head"])
  out2, _ = masked.update(other, masked.init(params), params, **extra_args(num_tasks))
  chex_close(out["trunk"], out2["trunk"])


# --- sharded runs ---------------------------------------------------------------


# Explicit mode, where a contraction over a sharded axis must name its output
# sharding; the engine's passes are checked in auto mode too (test_engine.py),
# and a method only ever sees the replicated T x T statistics.
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sharded_matches_single_device(case, axis_type=AxisType.Explicit):
  num_tasks = 3
  params = make_params()
  tx = case.make(num_tasks)
  grads = [random_grads(num_tasks, seed=s) for s in range(2)]
  reference, _ = run(tx, grads, params, num_tasks)

  mesh = jax.make_mesh((4,), ("model",), axis_types=(axis_type,))
  def place(tree, task_axis):
    def spec(x):
      dims = [None] * x.ndim
      dims[task_axis] = "model"  # the first parameter axis (size 8 or 4)
      return NamedSharding(mesh, P(*dims))
    return jax.tree.map(lambda x: jax.device_put(x, spec(x)), tree)

  with jax.set_mesh(mesh):
    sharded_params = place(params, 0)
    state = tx.init(sharded_params)
    update = jax.jit(tx.update)
    for step, (g, ref) in enumerate(zip(grads, reference)):
      out, state = update(place(g, 1), state, sharded_params,
                          **extra_args(num_tasks, step))
      chex_close(out, ref, rtol=1e-5, atol=1e-5)


# --- the state convention and the properties each method claims --------------


def flat(tree) -> np.ndarray:
  """An update as one float64 vector."""
  leaves = jax.tree.leaves(tree)
  return np.concatenate([np.asarray(l, np.float64).reshape(-1) for l in leaves])


def task_rows(task_grads) -> np.ndarray:
  leaves = jax.tree.leaves(task_grads)
  return np.concatenate([np.asarray(l, np.float64).reshape(l.shape[0], -1)
                         for l in leaves], axis=1)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_logs_the_weights_it_applied(case):
  # optax.tree.get(state, "task_weights") reads what multiplied each task's
  # gradient at this step: the update is rebuilt from it.
  num_tasks = 3
  params = make_params()
  tx = case.make(num_tasks)
  state = tx.init(params)
  for step in range(STEPS):
    grads = random_grads(num_tasks, seed=step)
    out, state = tx.update(grads, state, params, **extra_args(num_tasks, step))
    weights = optax.tree.get(state, "task_weights")
    assert weights.shape == (num_tasks,) and weights.dtype == jnp.float32
    np.testing.assert_allclose(mtl.applied_weights(state), weights)
    if not case.weighted_sum:
      continue  # the weights scale each task before a coordinate-wise rule
    rebuilt = (mtl.combine(weights, grads) if case.kind == "aggregator"
               else mtl.scale_tasks(weights, grads))
    chex_close(out, rebuilt, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_without_num_tasks_the_state_keeps_none(case):
  import inspect
  factory = getattr(mtl, case.name, None)
  if factory is None or "num_tasks" not in inspect.signature(factory).parameters:
    pytest.skip("the name is a configuration of another case")
  parameter = inspect.signature(factory).parameters["num_tasks"]
  if parameter.default is not None:
    pytest.skip("num_tasks is required: the state is shaped by T")
  try:
    tx = case.make(None)
  except ValueError as e:  # this configuration needs T (initial losses)
    assert "num_tasks=T" in str(e)
    pytest.skip(str(e))
  params = make_params()
  state = tx.init(params)
  assert optax.tree.get(state, "task_weights") is None
  _, new_state = jax.jit(tx.update)(random_grads(3), state, params, **extra_args(3))
  assert jax.tree.structure(new_state) == jax.tree.structure(state)


def claiming(claim):
  chosen = [c for c in CASES if claim in c.claims]
  return pytest.mark.parametrize("case", chosen, ids=[c.name for c in chosen])


def _run_fresh(case, grads_per_step, extras_per_step, num_tasks):
  tx = case.make(num_tasks)
  params = make_params()
  state = tx.init(params)
  outs = []
  for grads, extras in zip(grads_per_step, extras_per_step):
    out, state = tx.update(grads, state, params, **extras)
    outs.append(out)
  return outs


def _steps(num_tasks, seeds=(0, 1), scale=1.0):
  grads = [random_grads(num_tasks, seed=s, scale=scale) for s in seeds]
  extras = [extra_args(num_tasks, step) for step in range(len(seeds))]
  return grads, extras


@claiming("permutation_equivariant")
def test_permutation_equivariance(case):
  num_tasks = 4
  perm = np.array([2, 0, 3, 1])
  grads, extras = _steps(num_tasks)
  permute = lambda tree: jax.tree.map(lambda x: x[perm], tree)
  base = _run_fresh(case, grads, extras, num_tasks)
  moved = _run_fresh(case, [permute(g) for g in grads],
                     [{k: v[perm] for k, v in e.items()} for e in extras], num_tasks)
  for a, b in zip(base, moved):
    expected = a if case.kind == "aggregator" else permute(a)
    chex_close(b, expected, rtol=1e-4, atol=1e-5)


@claiming("homogeneous")
def test_homogeneous_in_the_gradients(case):
  num_tasks = 3
  grads, extras = _steps(num_tasks)
  base = _run_fresh(case, grads, extras, num_tasks)
  scaled = _run_fresh(case, [jax.tree.map(lambda x: 7.5 * x, g) for g in grads],
                      extras, num_tasks)
  for a, b in zip(base, scaled):
    chex_close(b, jax.tree.map(lambda x: 7.5 * x, a), rtol=1e-4, atol=1e-5)


@claiming("task_scale_invariant")
def test_invariant_to_each_tasks_scale(case):
  num_tasks = 3
  factors = jnp.array([1e-3, 1.0, 40.0])
  grads, extras = _steps(num_tasks)
  base = _run_fresh(case, grads, extras, num_tasks)
  scaled = _run_fresh(case, [mtl.scale_tasks(factors, g) for g in grads], extras,
                      num_tasks)
  for a, b in zip(base, scaled):
    chex_close(b, a, rtol=1e-4, atol=1e-5)


@claiming("non_conflicting")
@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_update_conflicts_with_no_task(case, num_tasks):
  for seed in range(4):
    # A shared component plus unequal scales: some pairs conflict.
    grads = random_grads(num_tasks, seed=seed)
    scales = jnp.logspace(-1, 1, num_tasks)
    grads = mtl.scale_tasks(scales, jax.tree.map(
        lambda g: g + 0.3 * g[:1], grads))
    (out,) = _run_fresh(case, [grads], [extra_args(num_tasks)], num_tasks)
    rows, update = task_rows(grads), flat(out)
    dots = rows @ update
    tolerance = 1e-4 * np.linalg.norm(rows, axis=1) * np.linalg.norm(update)
    assert np.all(dots >= -tolerance), (seed, dots)


@claiming("stationary_zero")
@pytest.mark.parametrize("num_tasks", [2, 3])
def test_zero_update_at_a_pareto_stationary_point(case, num_tasks):
  base = random_grads(num_tasks, seed=3)
  # The last task's gradient cancels a positive combination of the others,
  # so 0 is in the convex hull.
  def close_hull(g):
    head = g[:-1] * jnp.arange(1, num_tasks).reshape((-1,) + (1,) * (g.ndim - 1))
    return jnp.concatenate([g[:-1], -jnp.sum(head, axis=0, keepdims=True)])
  grads = jax.tree.map(close_hull, base)
  (out,) = _run_fresh(case, [grads], [extra_args(num_tasks)], num_tasks)
  scale = np.max(np.linalg.norm(task_rows(grads), axis=1))
  assert np.linalg.norm(flat(out)) <= 1e-4 * scale


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_error_parameter_shaped_gradients(case):
  # The gradient of the summed loss has no task axis: with params given the
  # mistake is named instead of the first parameter axis being taken as T.
  params = make_params()
  grads = jax.tree.map(jnp.ones_like, params)
  tx = case.make(8)
  with pytest.raises(ValueError, match=r"\(T,\) \+ param.shape"):
    tx.update(grads, tx.init(params), params, **extra_args(8))


def test_error_two_aggregators_in_one_chain():
  params = make_params()
  tx = optax.chain(mtl.mean(), mtl.mgda())
  with pytest.raises(ValueError, match="only one aggregator in a chain"):
    tx.update(random_grads(3), tx.init(params), params)


# --- precision classes: float16 and float64 at the ends of their ranges ------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float16_gradients_match_float32(case):
  # Small gradients and a tiny loss: weights such as 1 / L_t = 1e5 exceed
  # float16's range while the update does not. Statistics and weights are
  # float32; only the final combination is float16.
  num_tasks = 3
  params = make_params()
  grads32 = jax.tree.map(lambda g: g.astype(jnp.float16).astype(jnp.float32),
                         random_grads(num_tasks, scale=1e-3))
  grads16 = jax.tree.map(lambda g: g.astype(jnp.float16), grads32)
  extras = {"losses": jnp.array([1e-5, 1.0, 3.0]),
            "kpis": jnp.array([0.3, 0.6, 0.9])}
  outs = []
  for grads in (grads16, grads32):
    tx = case.make(num_tasks)
    out, _ = tx.update(grads, tx.init(params), params, **extras)
    outs.append(out)
  half, full = flat(outs[0]), flat(outs[1])
  assert np.all(np.isfinite(half))
  np.testing.assert_allclose(half, full, rtol=2e-3,
                             atol=2e-3 * np.max(np.abs(full)))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float64_gradients_at_extreme_scales(case):
  num_tasks = 3
  with jax.enable_x64(True):
    params = jax.tree.map(lambda p: p.astype(jnp.float64), make_params())
    base = jax.tree.map(lambda g: g.astype(jnp.float64), random_grads(num_tasks))
    results = {}
    for scale in (1e150, 1e-150):
      tx = case.make(num_tasks)
      grads = jax.tree.map(lambda g: g * scale, base)
      out, _ = tx.update(grads, tx.init(params), params, **extra_args(num_tasks))
      assert all(l.dtype == jnp.float64 for l in jax.tree.leaves(out))
      results[scale] = flat(out)
      assert np.all(np.isfinite(results[scale])), scale
      assert np.any(results[scale] != 0), scale
  if "homogeneous" in case.claims:
    np.testing.assert_allclose(results[1e150] / 1e150, results[1e-150] / 1e-150,
                               rtol=1e-5, atol=1e-12 * np.max(np.abs(
                                   results[1e-150] / 1e-150)))


# --- the non-finite policy: the step is skipped, the state kept ----------------


def _poisoned_steps(case, num_tasks):
  """Bad inputs of one step: a NaN or inf in one task's gradient, and a NaN in
  the losses or KPIs when the method reads them."""
  grads = random_grads(num_tasks, seed=5)
  nan_w = jax.tree.map(lambda g: g, grads)
  nan_w["trunk"]["w"] = grads["trunk"]["w"].at[1, 2, 3].set(jnp.nan)
  inf_head = jax.tree.map(lambda g: g, grads)
  inf_head["head"] = grads["head"].at[num_tasks - 1, 0, 1].set(-jnp.inf)
  steps = [(nan_w, {}), (inf_head, {})]
  if "losses" in case.needs:
    steps.append((grads, {"losses": jnp.array([1.0, jnp.nan, 2.0])[:num_tasks]}))
  if "kpis" in case.needs:
    steps.append((grads, {"kpis": jnp.array([0.5, jnp.inf, 0.7])[:num_tasks]}))
  return steps


def _skip_and_continue(case, update):
  num_tasks = 3
  params = make_params()
  tx = case.make(num_tasks)
  first, last = random_grads(num_tasks, seed=1), random_grads(num_tasks, seed=2)
  state = tx.init(params)
  _, state = update(tx, first, state, params, extra_args(num_tasks, 0))
  ref_out, ref_state = update(tx, last, state, params, extra_args(num_tasks, 1))
  for grads, bad in _poisoned_steps(case, num_tasks):
    out, skipped = update(tx, grads, state, params, {**extra_args(num_tasks, 1), **bad})
    for leaf in jax.tree.leaves(out):
      assert not np.any(np.asarray(leaf, np.float64)), bad
    weights = optax.tree.get(skipped, "task_weights", None)
    if weights is not None:
      np.testing.assert_array_equal(weights, np.zeros(num_tasks))
      skipped = optax.tree.set(skipped, task_weights=optax.tree.get(state, "task_weights"))
    chex_close(skipped, state, rtol=0, atol=0)
    # The next finite step continues as if the bad one had not happened.
    out, after = update(tx, last, skipped, params, extra_args(num_tasks, 1))
    chex_close(out, ref_out, rtol=0, atol=0)
    chex_close(after, ref_state, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_non_finite_step_is_skipped(case):
  _skip_and_continue(case, lambda tx, g, s, p, kw: tx.update(g, s, p, **kw))


@pytest.mark.parametrize("case", [c for c in CASES if c.name in {
    "mgda", "upgrad", "nash_mtl", "trimmed_mean", "scale_by_gradnorm",
    "scale_by_uncertainty", "dwa", "scale_by_dtp"}], ids=lambda c: c.name)
def test_non_finite_step_is_skipped_under_jit(case):
  compiled = {}

  def update(tx, g, s, p, kw):
    fn = compiled.setdefault(id(tx), jax.jit(tx.update))
    return fn(g, s, p, **kw)
  _skip_and_continue(case, update)
