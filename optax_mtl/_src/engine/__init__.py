"""The engine: every pass over the full per-task gradients, and their checks."""
