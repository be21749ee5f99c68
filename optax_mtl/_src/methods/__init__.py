"""The methods, one module each, grouped by family."""
