"""Solvers of the small T x T problems, in JAX, on the device."""
