"""Strict JAX settings for the whole suite.

Rank promotion raises, warnings are errors (pyproject.toml), and four CPU
devices exist so that sharded runs can be compared with single-device ones.
"""

import jax

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_numpy_rank_promotion", "raise")
