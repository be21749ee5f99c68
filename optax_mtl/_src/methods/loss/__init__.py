"""Methods whose weights depend on the losses (or KPIs) alone."""
