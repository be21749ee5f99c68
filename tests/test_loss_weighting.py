"""Loss-space weighting: each rule against hand-computed numbers."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl as mtl

EYE3 = jnp.eye(3)


def weights_of(tx, state, losses, **extra):
  """Weights applied by a scaling: probe with identity per-task gradients."""
  out, state = tx.update(jnp.eye(len(losses)), state, None,
                         losses=jnp.asarray(losses, jnp.float32), **extra)
  return np.asarray(jnp.diagonal(out)), state


# --- initial and prior losses -------------------------------------------------


def test_initial_loss_recorded_at_first_update():
  tx = mtl.scale_by_initial_loss(num_tasks=3)
  state = tx.init(None)
  w, state = weights_of(tx, state, [2.0, 0.5, 4.0])
  np.testing.assert_allclose(w, [0.5, 2.0, 0.25])
  w, state = weights_of(tx, state, [1.0, 1.0, 1.0])  # later losses do not move it
  np.testing.assert_allclose(w, [0.5, 2.0, 0.25])
  np.testing.assert_allclose(state.initial_losses, [2.0, 0.5, 4.0])
  np.testing.assert_allclose(optax.tree.get(state, "task_weights"), [0.5, 2.0, 0.25])


def test_initial_loss_given_and_theoretical_estimates():
  # 10-class cross-entropy -> log 10; L2 regression on y -> E||y||^2.
  targets = np.array([[1.0, 2.0], [3.0, 0.0]])  # ||y||^2 = 5, 9
  reference = [mtl.cross_entropy_initial_loss(10), mtl.l2_initial_loss(targets)]
  np.testing.assert_allclose(reference, [math.log(10), 7.0])
  assert mtl.l2_initial_loss(targets, reduction="mean") == pytest.approx(3.5)
  tx = mtl.scale_by_initial_loss(reference)
  w, _ = weights_of(tx, tx.init(None), [9.0, 9.0])
  np.testing.assert_allclose(w, [1 / math.log(10), 1 / 7.0], rtol=1e-6)


def test_prior_loss_helpers_and_weights():
  # Frequencies (1/2, 1/4, 1/4): entropy = 1.5 log 2.
  labels = np.array([0, 0, 1, 2])
  entropy = mtl.cross_entropy_prior_loss(labels=labels, num_classes=3)
  assert entropy == pytest.approx(1.5 * math.log(2))
  assert mtl.cross_entropy_prior_loss(frequencies=[2, 1, 1]) == pytest.approx(entropy)
  variance = mtl.l2_prior_loss(np.array([[1.0, 0.0], [3.0, 4.0]]))  # 1 + 4
  assert variance == pytest.approx(5.0)
  tx = mtl.scale_by_prior_loss(jnp.array([entropy, variance]))
  w, state = weights_of(tx, tx.init(None), [1.0, 1.0])
  np.testing.assert_allclose(w, [1 / entropy, 0.2], rtol=1e-6)
  np.testing.assert_allclose(state.task_weights, w)


@pytest.mark.parametrize("call, match", [
    (lambda: mtl.scale_by_initial_loss(), "initial_losses=.*num_tasks=T"),
    (lambda: mtl.scale_by_initial_loss([1.0, 0.0]), r"initial_losses.*> 0.*\[1\]"),
    (lambda: mtl.scale_by_initial_loss([1.0, 2.0], num_tasks=3), "num_tasks=3"),
    (lambda: mtl.scale_by_prior_loss(jnp.ones((2, 2))), "vector"),
    (lambda: mtl.cross_entropy_initial_loss(1), ">= 2"),
    (lambda: mtl.cross_entropy_prior_loss(frequencies=[3, 0]), "only one class"),
    (lambda: mtl.cross_entropy_prior_loss(labels=[0, 5], num_classes=3), r"\[0, 3\)"),
    (lambda: mtl.cross_entropy_prior_loss(), "either labels"),
    (lambda: mtl.l2_prior_loss(np.ones((4, 2))), "constant"),
    (lambda: mtl.l2_initial_loss(np.ones(3), reduction="max"), "reduction"),
])
def test_reference_loss_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_num_tasks_must_be_an_int():
  with pytest.raises(TypeError, match="static_args"):
    mtl.scale_by_uncertainty(num_tasks=jnp.asarray(3))


def test_built_for_other_task_count():
  tx = mtl.scale_by_initial_loss(num_tasks=2)
  with pytest.raises(ValueError, match="built for 2 tasks"):
    weights_of(tx, tx.init(None), [1.0, 1.0, 1.0])


# --- real-time and geometric -----------------------------------------------------


def _toy_losses(theta):
  # Three tasks of very different scales.
  return jnp.stack([jnp.sum(theta ** 2), 100.0 * jnp.sum(jnp.sin(theta)) ** 2 + 1.0,
                    0.01 * jnp.sum(jnp.exp(theta))])


THETA = jnp.array([0.3, -0.7, 1.1])


def _aggregate(tx, theta, **extra):
  losses, grads = mtl.value_and_jacobian(_toy_losses)(theta)
  out, _ = tx.update(grads, tx.init(theta), theta, losses=losses, **extra)
  return losses, out


def test_realtime_equalises_effective_losses_and_is_grad_of_sum_log():
  tx = mtl.scale_by_realtime_loss()
  losses = jnp.array([4.0, 0.5, 1e-3])
  w, _ = weights_of(tx, tx.init(None), losses)
  np.testing.assert_allclose(w * losses, [1.0, 1.0, 1.0], rtol=1e-6)
  _, update = _aggregate(optax.chain(tx, mtl.sum()), THETA)
  expected = jax.grad(lambda t: jnp.sum(jnp.log(_toy_losses(t))))(THETA)
  np.testing.assert_allclose(update, expected, rtol=1e-5)
  # Scale invariance: multiplying a loss by a constant changes nothing.
  scaled = lambda t: _toy_losses(t) * jnp.array([1.0, 1e4, 1e-3])
  losses, grads = mtl.value_and_jacobian(scaled)(THETA)
  summed = optax.chain(tx, mtl.sum())
  out, _ = summed.update(grads, summed.init(None), losses=losses)
  np.testing.assert_allclose(out, expected, rtol=1e-4)


def test_geometric_is_gradient_of_geometric_mean():
  _, update = _aggregate(mtl.geometric_loss_weighting(), THETA)
  geo = lambda t: jnp.prod(_toy_losses(t)) ** (1.0 / 3.0)
  np.testing.assert_allclose(update, jax.grad(geo)(THETA), rtol=1e-5)
  geometric = mtl.scale_by_geometric_loss()
  w, _ = weights_of(geometric, geometric.init(None), [1.0, 8.0, 1.0])
  np.testing.assert_allclose(w, [2 / 3, 2 / 24, 2 / 3], rtol=1e-6)
  # Many tiny losses: the product underflows, the log-space weights do not.
  tiny = jnp.full(64, 1e-3)
  w, _ = weights_of(geometric, geometric.init(None), tiny)
  np.testing.assert_allclose(w, np.full(64, 1 / 64), rtol=1e-5)


# --- uncertainty and IMTL-L ------------------------------------------------------


def test_uncertainty_one_sgd_step_matches_closed_form():
  lr, losses = 0.1, np.array([0.5, 2.0, 8.0])
  for regularizer in ("log", "log1p"):
    tx = mtl.scale_by_uncertainty(num_tasks=3, regularizer=regularizer,
                                  optimizer=optax.sgd(lr),
                                  init_log_variance=jnp.array([0.0, 1.0, -1.0]))
    state = tx.init(None)
    s = np.array([0.0, 1.0, -1.0])
    w, state = weights_of(tx, state, losses)
    np.testing.assert_allclose(w, 0.5 * np.exp(-s), rtol=1e-6)
    reg_grad = 0.5 if regularizer == "log" else 1 / (1 + np.exp(-s))
    expected = s - lr * (-0.5 * losses * np.exp(-s) + reg_grad)
    np.testing.assert_allclose(state.log_variance, expected, rtol=1e-5)


@pytest.mark.parametrize("regularizer", ["log", "log1p"])
def test_uncertainty_moves_to_its_fixed_point(regularizer):
  losses = jnp.array([0.5, 2.0, 8.0])
  tx = mtl.scale_by_uncertainty(num_tasks=3, regularizer=regularizer,
                                optimizer=optax.sgd(0.5))
  update = jax.jit(tx.update)
  state = tx.init(None)
  gaps = []
  target = (losses if regularizer == "log"
            else (losses + jnp.sqrt(losses ** 2 + 8 * losses)) / 4)
  for _ in range(300):
    _, state = update(EYE3, state, None, losses=losses)
    gaps.append(np.abs(np.exp(state.log_variance) - target))
  assert np.all(np.diff(np.max(np.stack(gaps), axis=1))[:50] <= 1e-7)  # monotone
  np.testing.assert_allclose(np.exp(state.log_variance), target, rtol=1e-4)
  np.testing.assert_allclose(state.task_weights, 0.5 / target, rtol=1e-3)


def test_uncertainty_default_adam_moves_towards_losses():
  tx = mtl.uncertainty_weighting(num_tasks=2, learning_rate=0.05)
  state = tx.init(None)
  for _ in range(100):
    _, state = tx.update(jnp.ones((2, 1)), state, losses=jnp.array([0.1, 10.0]))
  s = optax.tree.get(state, "log_variance")
  assert s[0] < -1.0 and s[1] > 1.0  # sigma^2 far below / above 1, toward L


def test_imtl_l_moves_to_equal_scaled_losses():
  losses = jnp.array([0.25, 1.0, 4.0])
  tx = mtl.scale_by_imtl_l(num_tasks=3, optimizer=optax.sgd(0.1))
  state = tx.init(None)
  w, state = weights_of(tx, state, losses)
  np.testing.assert_allclose(w, [1.0, 1.0, 1.0])
  np.testing.assert_allclose(state.log_scale, -0.1 * (np.asarray(losses) - 1.0), rtol=1e-6)
  update = jax.jit(tx.update)
  for _ in range(400):
    _, state = update(EYE3, state, None, losses=losses)
  np.testing.assert_allclose(np.exp(state.log_scale) * losses, 1.0, rtol=1e-4)


@pytest.mark.parametrize("regularizer", ["log", "log1p"])
def test_uncertainty_warm_start_begins_at_the_fixed_point(regularizer):
  # Losses 1e-3 .. 1e5: the first update already weights 1 / (2 sigma^2(L)),
  # and the step there leaves s unchanged (zero gradient at the fixed point).
  losses = jnp.array([1e-3, 2.0, 1e5])
  tx = mtl.scale_by_uncertainty(num_tasks=3, regularizer=regularizer,
                                warm_start=True, optimizer=optax.sgd(0.1),
                                init_log_variance=5.0)
  state = tx.init(None)
  w, state = weights_of(tx, state, losses)
  l64 = np.asarray(losses, np.float64)
  sigma2 = l64 if regularizer == "log" else (l64 + np.sqrt(l64 ** 2 + 8 * l64)) / 4
  np.testing.assert_allclose(w, 0.5 / sigma2, rtol=1e-5)
  np.testing.assert_allclose(np.exp(state.log_variance), sigma2, rtol=1e-4)
  assert int(state.count) == 1
  # Later updates learn as usual: new losses move s away from the old point.
  w2, state = weights_of(tx, state, 2.0 * losses)
  np.testing.assert_allclose(w2, w, rtol=1e-4)
  assert np.all(np.asarray(state.log_variance) > np.log(sigma2) + 1e-3)


def test_imtl_l_warm_start_scales_every_loss_to_one():
  losses = jnp.array([1e-3, 2.0, 1e5])
  tx = mtl.imtl_l(num_tasks=3, warm_start=True)
  state = tx.init({"w": jnp.zeros(1)})
  grads = {"w": jnp.ones((3, 1))}
  out, state = tx.update(grads, state, losses=losses)
  np.testing.assert_allclose(out["w"], [np.sum(1.0 / np.asarray(losses))], rtol=1e-5)
  np.testing.assert_allclose(optax.tree.get(state, "task_weights") * losses, 1.0,
                             rtol=1e-5)


def test_warm_start_flag_is_checked():
  with pytest.raises(TypeError, match="warm_start must be True or False"):
    mtl.scale_by_uncertainty(num_tasks=2, warm_start="yes")
  with pytest.raises(TypeError, match="warm_start must be True or False"):
    mtl.scale_by_imtl_l(num_tasks=2, warm_start=1)


# --- DWA -----------------------------------------------------------------------


def test_dwa_weights_after_three_periods():
  temperature, period = 2.0, 2
  tx = mtl.scale_by_dwa(temperature, num_tasks=2, period=period)
  state = tx.init(None)
  per_step = [[4.0, 2.0], [2.0, 2.0],   # period 1, means (3, 2)
              [1.0, 2.0], [2.0, 1.0],   # period 2, means (1.5, 1.5)
              [0.5, 1.5], [1.0, 1.5],   # period 3, means (0.75, 1.5)
              [9.0, 9.0]]
  seen = []
  for losses in per_step:
    w, state = weights_of(tx, state, losses)
    seen.append(w)

  def expected(r):
    e = np.exp(np.asarray(r) / temperature)
    return 2 * e / e.sum()

  for k in range(4):  # fewer than two complete periods
    np.testing.assert_allclose(seen[k], [1.0, 1.0])
  for k in (4, 5):  # r = period 2 / period 1
    np.testing.assert_allclose(seen[k], expected([0.5, 0.75]), rtol=1e-6)
  np.testing.assert_allclose(seen[6], expected([0.5, 1.0]), rtol=1e-6)
  np.testing.assert_allclose(np.sum(seen[6]), 2.0, rtol=1e-6)
  assert seen[6][1] > seen[6][0]  # the slower task gets more weight


def test_dwa_per_step_and_errors():
  tx = mtl.scale_by_dwa(1.0, num_tasks=3)
  state = tx.init(None)
  for losses in ([1.0, 1.0, 1.0], [1.0, 2.0, 0.5]):
    _, state = weights_of(tx, state, losses)
  w, _ = weights_of(tx, state, [5.0, 5.0, 5.0])
  e = np.exp([1.0, 2.0, 0.5])
  np.testing.assert_allclose(w, 3 * e / e.sum(), rtol=1e-6)
  with pytest.raises(ValueError, match="temperature"):
    mtl.scale_by_dwa(0.0, num_tasks=2)
  with pytest.raises(ValueError, match="period"):
    mtl.scale_by_dwa(num_tasks=2, period=1.5)


# --- DTP -----------------------------------------------------------------------


def test_dtp_weights_and_smoothing():
  gamma = jnp.array([0.0, 1.0, 2.0])
  tx = mtl.scale_by_dtp(gamma, num_tasks=3, smoothing=0.5)
  state = tx.init(None)
  k1 = np.array([0.5, 0.8, 1.0])
  w, state = weights_of(tx, state, [1.0, 1.0, 1.0], kpis=jnp.asarray(k1))
  np.testing.assert_allclose(w, -(1 - k1) ** np.array([0.0, 1.0, 2.0]) * np.log(k1),
                             rtol=1e-6, atol=1e-7)
  k2 = np.array([0.1, 0.4, 0.6])
  w, state = weights_of(tx, state, [1.0, 1.0, 1.0], kpis=jnp.asarray(k2))
  kbar = 0.5 * k1 + 0.5 * k2
  np.testing.assert_allclose(state.kpis, kbar, rtol=1e-6)
  np.testing.assert_allclose(w, -(1 - kbar) ** np.array([0.0, 1.0, 2.0]) * np.log(kbar),
                             rtol=1e-5)


@pytest.mark.parametrize("kpis", [[0.0, 0.5], [0.5, 1.5], [-0.1, 0.2]])
def test_dtp_rejects_concrete_kpis_outside_unit_interval(kpis):
  tx = mtl.scale_by_dtp(1.0, num_tasks=2)
  with pytest.raises(ValueError, match=r"kpis must lie in \(0, 1\]"):
    weights_of(tx, tx.init(None), [1.0, 1.0], kpis=jnp.array(kpis))


def test_dtp_clamps_traced_kpis():
  tx = mtl.scale_by_dtp(1.0, num_tasks=4)
  out, state = jax.jit(tx.update)(jnp.eye(4), tx.init(None), None,
                                  kpis=jnp.array([0.0, 2.0, 1e-9, 0.5]))
  floor = 1e-6
  expected = -(1 - np.array([floor, 1.0, floor, 0.5])) * np.log([floor, 1.0, floor, 0.5])
  np.testing.assert_allclose(jnp.diagonal(out), expected, rtol=1e-5)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


def test_dtp_kpis_errors():
  tx = mtl.scale_by_dtp(1.0, num_tasks=2)
  with pytest.raises(TypeError, match="needs the per-task kpis"):
    tx.update(jnp.eye(2), tx.init(None), losses=jnp.ones(2))
  with pytest.raises(ValueError, match="kpis has 3 entries"):
    tx.update(jnp.eye(2), tx.init(None), kpis=jnp.full(3, 0.5))
  with pytest.raises(ValueError, match="gamma"):
    mtl.scale_by_dtp(-1.0, num_tasks=2)
  with pytest.raises(ValueError, match="smoothing"):
    mtl.scale_by_dtp(1.0, num_tasks=2, smoothing=1.0)


# --- RLW -----------------------------------------------------------------------


def test_random_weighting_draws_softmax_of_normals_per_step():
  tx = mtl.scale_by_random(seed=3)
  state = tx.init(None)
  key = jax.random.key(3)
  previous = None
  for _ in range(3):
    w, state = weights_of(tx, state, [1.0, 1.0, 1.0])
    key, sample = jax.random.split(key)
    np.testing.assert_allclose(w, jax.nn.softmax(jax.random.normal(sample, (3,))),
                               rtol=1e-6)
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)
    assert previous is None or not np.allclose(w, previous)
    previous = w
  # vmap over seeds: one state per seed.
  states = jax.vmap(lambda s: mtl.scale_by_random(s).init(None))(jnp.arange(2))
  assert states.key.shape[0] == 2
  assert not np.array_equal(states.key[0], states.key[1])


# --- FAMO ----------------------------------------------------------------------


def test_famo_first_and_second_step_by_hand():
  lr, decay = 0.1, 0.01
  tx = mtl.scale_by_famo(num_tasks=3, optimizer=optax.sgd(lr), weight_decay=decay)
  state = tx.init(None)
  l0 = np.array([1.0, 2.0, 4.0])
  w, state = weights_of(tx, state, l0)
  # Uniform z: w_t = (1 / L_t) / sum_s (1 / L_s).
  np.testing.assert_allclose(w, (1 / l0) / np.sum(1 / l0), rtol=1e-6)
  np.testing.assert_allclose(state.logits, 0.0)
  l1 = np.array([0.5, 2.0, 3.0])  # task 0 fell the most
  w, state = weights_of(tx, state, l1)
  z = np.full(3, 1 / 3)
  delta = np.log(l0) - np.log(l1)
  grad = z * delta - z * np.dot(z, delta)
  xi = -lr * grad
  np.testing.assert_allclose(state.logits, xi, rtol=1e-5, atol=1e-7)
  z = np.exp(xi) / np.exp(xi).sum()
  np.testing.assert_allclose(w, (z / l1) / np.sum(z / l1), rtol=1e-5)
  assert state.logits[0] < state.logits[1]


def test_famo_previous_batch_losses_gives_same_batch_decrease():
  tx = mtl.scale_by_famo(num_tasks=2, optimizer=optax.sgd(1.0), weight_decay=0.0)
  state = tx.init(None)
  _, state = weights_of(tx, state, [2.0, 2.0])
  # A fresh batch says task 1 fell; the same batch at the new parameters
  # (previous_batch_losses) says task 0 fell: the latter drives the logits.
  _, state = weights_of(tx, state, [2.0, 1.0],
                        previous_batch_losses=jnp.array([1.0, 2.0]))
  assert state.logits[0] < state.logits[1]
  with pytest.raises(ValueError, match="previous_batch_losses has 3 entries"):
    weights_of(tx, state, [2.0, 1.0], previous_batch_losses=jnp.ones(3))


def test_famo_min_losses_shift():
  tx = mtl.scale_by_famo(num_tasks=2, min_losses=jnp.array([1.0, 0.0]))
  w, _ = weights_of(tx, tx.init(None), [2.0, 3.0])  # D = (1, 3)
  np.testing.assert_allclose(w, [0.75, 0.25], rtol=1e-6)
  with pytest.raises(ValueError, match="losses - min_losses"):
    weights_of(tx, tx.init(None), [0.5, 3.0])


# --- bad losses ----------------------------------------------------------------

LOSS_BASED = {
    "initial": lambda: mtl.scale_by_initial_loss(num_tasks=3),
    "realtime": mtl.scale_by_realtime_loss,
    "uncertainty": lambda: mtl.scale_by_uncertainty(num_tasks=3),
    "uncertainty_log1p": lambda: mtl.scale_by_uncertainty(num_tasks=3, regularizer="log1p"),
    "dwa": lambda: mtl.scale_by_dwa(num_tasks=3),
    "geometric": mtl.scale_by_geometric_loss,
    "imtl_l": lambda: mtl.scale_by_imtl_l(num_tasks=3),
    "famo": lambda: mtl.scale_by_famo(num_tasks=3),
}
BAD = {"zero": [1.0, 0.0, 2.0], "negative": [1.0, -1.0, 2.0],
       "nan": [1.0, np.nan, 2.0], "inf": [1.0, np.inf, 2.0]}
# A NaN or inf loss skips the step (the property matrix checks it); a zero or
# negative one is a mistake in the loss function.
WRONG = {k: BAD[k] for k in ("zero", "negative")}


@pytest.mark.parametrize("name", list(LOSS_BASED))
@pytest.mark.parametrize("bad", list(WRONG))
def test_non_positive_concrete_losses_raise(name, bad):
  tx = LOSS_BASED[name]()
  with pytest.raises(ValueError, match=r"must be > 0; task\(s\) \[1\]"):
    weights_of(tx, tx.init(None), WRONG[bad])


@pytest.mark.parametrize("name", list(LOSS_BASED))
def test_bad_traced_losses_are_clamped_never_nan(name):
  tx = optax.chain(LOSS_BASED[name](), mtl.sum())
  update = jax.jit(tx.update)
  state = tx.init(None)
  grads = {"w": jnp.ones((3, 2))}
  for losses in [*BAD.values(), [1.0, 2.0, 3.0], [0.0, np.nan, -np.inf]]:
    out, state = update(grads, state, None, losses=jnp.array(losses))
    for leaf in jax.tree.leaves((out, state)):
      assert np.all(np.isfinite(np.asarray(leaf, np.float64))), (losses, leaf)


def test_clamp_floor_value_under_jit():
  tx = mtl.scale_by_realtime_loss()
  out, _ = jax.jit(tx.update)(jnp.eye(2), tx.init(None), None,
                              losses=jnp.array([0.0, 3e38]))
  np.testing.assert_allclose(jnp.diagonal(out), [1e12, 1e-30], rtol=1e-5)


# --- priorities on top -----------------------------------------------------------

ALIASES = {
    "initial_loss_weighting": lambda p: mtl.initial_loss_weighting(num_tasks=3, priorities=p),
    "realtime_loss_weighting": lambda p: mtl.realtime_loss_weighting(priorities=p),
    "uncertainty_weighting": lambda p: mtl.uncertainty_weighting(num_tasks=3, priorities=p),
    "dwa": lambda p: mtl.dwa(num_tasks=3, priorities=p),
    "dtp": lambda p: mtl.dtp(2.0, num_tasks=3, priorities=p),
    "random_weighting": lambda p: mtl.random_weighting(1, priorities=p),
    "geometric_loss_weighting": lambda p: mtl.geometric_loss_weighting(priorities=p),
    "imtl_l": lambda p: mtl.imtl_l(num_tasks=3, priorities=p),
    "famo": lambda p: mtl.famo(num_tasks=3, priorities=p),
    "prior_loss_weighting": lambda p: mtl.prior_loss_weighting(
        jnp.array([1.0, 2.0, 3.0]), priorities=p),
}


@pytest.mark.parametrize("name", list(ALIASES))
def test_priorities_multiply_the_weights(name):
  priorities = jnp.array([1.0, 0.5, 2.0])
  plain, prioritised = ALIASES[name](None), ALIASES[name](priorities)
  grads = {"w": jnp.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])}
  s_plain, s_prio = plain.init(None), prioritised.init(None)
  for step in range(3):
    extra = {"losses": jnp.array([1.0, 2.0, 3.0]) / (1 + step),
             "kpis": jnp.array([0.2, 0.5, 0.9])}
    w, s_plain = mtl.loss_weights(plain, s_plain, **extra)
    out, s_prio = prioritised.update(grads, s_prio, None, **extra)
    np.testing.assert_allclose(out["w"], (priorities * w) @ grads["w"], rtol=1e-5)


def test_alias_accepts_shared_and_is_a_chain_with_sum():
  mask = {"trunk": True, "head": False}
  tx = mtl.realtime_loss_weighting(shared=mask)
  grads = {"trunk": jnp.array([[2.0], [4.0]]), "head": jnp.array([[2.0], [4.0]])}
  out, _ = tx.update(grads, tx.init(None), None, losses=jnp.array([2.0, 4.0]))
  # The scaling applies to every leaf (heads included): 2/2 + 4/4.
  np.testing.assert_allclose(out["trunk"], [2.0])
  np.testing.assert_allclose(out["head"], [2.0])


def test_inject_hyperparams():
  make = optax.inject_hyperparams(mtl.scale_by_dtp, static_args=("num_tasks",))
  tx = make(gamma=2.0, num_tasks=2)
  state = tx.init(None)
  out, state = jax.jit(tx.update)(jnp.eye(2), state, None, kpis=jnp.array([0.5, 0.9]))
  k = np.array([0.5, 0.9])
  np.testing.assert_allclose(jnp.diagonal(out), -(1 - k) ** 2 * np.log(k), rtol=1e-6)
  state.hyperparams["gamma"] = jnp.asarray(0.0)
  out, _ = jax.jit(tx.update)(jnp.eye(2), state, None, kpis=jnp.array([0.5, 0.9]))
  np.testing.assert_allclose(jnp.diagonal(out), -np.log(k), rtol=1e-6)
  make = optax.inject_hyperparams(mtl.scale_by_dwa, static_args=("num_tasks",))
  tx = make(temperature=1.0, num_tasks=2, period=2)
  state = tx.init(None)
  for _ in range(5):
    _, state = jax.jit(tx.update)(jnp.eye(2), state, None, losses=jnp.ones(2))
  assert int(state.inner_state.periods) == 2


@pytest.mark.parametrize("make", [
    lambda: mtl.scale_by_uncertainty(num_tasks=2, regularizer="log1p", warm_start=True),
    lambda: mtl.scale_by_uncertainty(num_tasks=2, warm_start=True),
    lambda: mtl.scale_by_imtl_l(num_tasks=2, warm_start=True),
], ids=["uncertainty_log1p", "uncertainty_log", "imtl_l"])
def test_warm_start_compiled_equals_eager(make):
  # At the fixed point the closed-form gradient is rounding noise, which
  # differs between eager and compiled code; Adam must not amplify it.
  tx = make()
  eager, compiled = tx.init(None), tx.init(None)
  update = jax.jit(tx.update)
  for step in range(4):
    losses = jnp.array([1e-3, 50.0]) * (1.0 + step)
    out_e, eager = tx.update(EYE3[:2, :2], eager, losses=losses)
    out_c, compiled = update(EYE3[:2, :2], compiled, losses=losses)
    np.testing.assert_allclose(out_c, out_e, rtol=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda: mtl.scale_by_uncertainty(num_tasks=2, learning_rate=-1e-2), "learning_rate must be finite and > 0"),
    (lambda: mtl.scale_by_imtl_l(num_tasks=2, learning_rate=0.0), "learning_rate must be finite and > 0"),
    (lambda: mtl.scale_by_famo(num_tasks=2, learning_rate=float("nan")), "learning_rate must be finite and > 0"),
    (lambda: mtl.cagrad(c=float("inf")), "c must be finite and >= 0"),
    (lambda: mtl.dwa(num_tasks=2, period=1.5), "period must be an integer >= 1"),
    (lambda: mtl.mgda(max_iters=0), "max_iters must be an integer >= 1"),
])
def test_invalid_hyperparameters_name_the_range(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_hyperparameters_stay_traceable():
  tx = optax.inject_hyperparams(mtl.scale_by_uncertainty, static_args=("num_tasks",))(
      num_tasks=2, learning_rate=0.05)
  out, _ = jax.jit(tx.update)(EYE3[:2, :2], tx.init(None), losses=jnp.array([1.0, 2.0]))
  np.testing.assert_allclose(jnp.diagonal(out), [0.5, 0.5])
