"""Methods that weigh the task gradients from their Gramian (and the losses)."""
