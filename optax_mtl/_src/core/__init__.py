"""The weighting core: a method is a declared weighting; builders make it optax."""
