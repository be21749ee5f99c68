"""Methods whose weights depend on the per-task gradients' statistics."""
