"""Strict JAX settings for the whole suite.

The suite runs on the CPU backend whatever the machine has (so it also runs
on a GPU host), with four virtual CPU devices so that sharded runs can be
compared with single-device ones. Rank promotion raises and warnings are
errors (pyproject.toml).
"""

import jax

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_numpy_rank_promotion", "raise")
