"""Strict JAX settings for the whole suite.

The suite runs on the CPU backend whatever the machine has (so it also runs
on a GPU host), with four virtual CPU devices so that sharded runs can be
compared with single-device ones. Rank promotion raises and warnings are
errors (pyproject.toml).

Compiled programs go to a persistent cache shared by the xdist workers and
the subprocesses some tests start (a restart in a new process compiles the
same programs again). Entries are keyed by the program and the JAX version,
so a stale entry is never used; ``JAX_COMPILATION_CACHE_DIR`` overrides the
place.
"""

import os

import jax

_CACHE = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                 ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
# Every program, however small: most of the suite's time is compilation.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_numpy_rank_promotion", "raise")
