"""Capture: a model and its example inputs as torch.export sees them (structured I/O, shape ranges,
lowering), and the eager model rebuilt from weights (trusted factories only)."""
