"""pytest-trtrefit: pytest plugin, fixtures and Hypothesis strategies that prove TensorRT weight refit
correct against eager PyTorch."""
__version__ = "0.1.0"
