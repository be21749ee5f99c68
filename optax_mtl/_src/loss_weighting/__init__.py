"""Loss-space task weighting: weights computed from the task losses alone.

Each module holds one method family as a task scaling (per-task gradients in,
task t multiplied by its weight w_t out) plus an alias that chains the scaling
with :func:`optax_mtl.sum` (or :func:`optax_mtl.weighted` for priorities).
:mod:`one_backward` turns any of them into weights for a single backward pass.
"""
