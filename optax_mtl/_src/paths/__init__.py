"""Gradient paths: how a train step obtains what a method reads."""
