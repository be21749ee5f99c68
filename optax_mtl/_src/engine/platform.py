"""Code paths chosen by the backend, and a switch to run the accelerator ones on CPU.

Some computations have a CPU form and a form for accelerators, picked when
the program is lowered (``lax.platform_dependent``): a blocked Gramian for
XLA:CPU's contraction, problems solved one after another rather than
vmapped, loop trips of one step rather than an unrolled block. Every choice
goes through :func:`dependent`, so that :func:`accelerator_forms` can make
all of them take the accelerator form whatever the backend: the tests run
on CPU the programs a GPU or TPU would run and check them against the CPU
forms, on machines that have no accelerator.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import jax
from jax import lax

_ACCELERATOR_FORMS = False


def dependent(*args: Any, cpu: Callable[..., Any], default: Callable[..., Any]) -> Any:
  """``cpu(*args)`` on CPU, ``default(*args)`` on other backends.

  As ``lax.platform_dependent``; inside :func:`accelerator_forms`,
  ``default(*args)`` on every backend.
  """
  if _ACCELERATOR_FORMS:
    return default(*args)
  return lax.platform_dependent(*args, cpu=cpu, default=default)


def accelerator_forms_active() -> bool:
  """Whether :func:`accelerator_forms` is in effect."""
  return _ACCELERATOR_FORMS


@contextlib.contextmanager
def accelerator_forms() -> Iterator[None]:
  """Within the block, every :func:`dependent` choice takes the accelerator form.

  For tests. JAX's compilation caches are cleared on entry and on exit, so
  no program traced with the other forms is reused. Not thread-safe.
  """
  global _ACCELERATOR_FORMS
  previous = _ACCELERATOR_FORMS
  jax.clear_caches()
  _ACCELERATOR_FORMS = True
  try:
    yield
  finally:
    _ACCELERATOR_FORMS = previous
    jax.clear_caches()
