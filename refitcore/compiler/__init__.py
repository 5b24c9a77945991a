"""Compile: the steps in order, from a model to a RefittableEngine; MutableEngine."""
