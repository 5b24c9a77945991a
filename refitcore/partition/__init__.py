"""Partition: which ops run in TensorRT and which in PyTorch, and the PyTorch segments as data."""
