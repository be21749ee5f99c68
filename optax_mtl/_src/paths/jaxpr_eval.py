"""Re-evaluating a jaxpr with jitted calls inlined, some equations rewritten.

The gradient paths read and rewrite what JAX's differentiation produced: the
per-task loops put convolutions in XLA:CPU's fast order
(``canonical_convolutions``), the memory-lean Gramian finds the weight
gradients of dense layers (``factored_gramian``). Both need the equations of
jitted calls (a Flax module's ``nnx.jit``, a user's ``jax.jit``) at top level.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
from jax.extend import core

# A rewrite returns an equation's outputs from its input values, or None to
# leave the equation as it is.
Rewrite = Callable[[Any, list], "list | None"]

CALLS = ("jit", "pjit", "closed_call")


def evaluate(jaxpr, consts: Sequence[Any], args: Sequence[Any],
             rewrite: Rewrite | None = None, outvars: Sequence[Any] | None = None) -> list:
  """The values of ``outvars`` (default the outputs) of ``jaxpr`` on ``args``.

  Jitted calls are inlined (so that ``rewrite`` sees their equations too);
  control flow (``scan``, ``cond``, ``while``) is bound as it is.
  """
  env = {}

  def read(var):
    return var.val if isinstance(var, core.Literal) else env[var]

  for var, value in zip(jaxpr.constvars, consts):
    env[var] = value
  for var, value in zip(jaxpr.invars, args):
    env[var] = value
  for eqn in jaxpr.eqns:
    values = [read(v) for v in eqn.invars]
    outs = rewrite(eqn, values) if rewrite is not None else None
    if outs is None and eqn.primitive.name in CALLS:
      inner = eqn.params["jaxpr" if "jaxpr" in eqn.params else "call_jaxpr"]
      outs = evaluate(inner.jaxpr, inner.consts, values, rewrite)
    elif outs is None:
      bound = eqn.primitive.get_bind_params(eqn.params)
      # JAX before 0.9.2 returns (subfunctions, params), later the params alone.
      subfuns, bind_params = bound if isinstance(bound, tuple) else ((), bound)
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*subfuns, *values, **bind_params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    for var, value in zip(eqn.outvars, outs):
      env[var] = value
  return [read(v) for v in (jaxpr.outvars if outvars is None else outvars)]


def inlined(fn: Callable[..., Any], *args) -> Any:
  """The closed jaxpr of ``fn`` (positional array arguments), jitted calls inlined."""
  closed = jax.make_jaxpr(fn)(*args)
  return jax.make_jaxpr(
      lambda *a: evaluate(closed.jaxpr, closed.consts, a))(*args)
