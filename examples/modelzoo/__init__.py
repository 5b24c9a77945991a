"""A small model zoo: the models this example repository ships and wants to refit safely."""
from .models import MODELS, DepthwiseClassifier, TiedAutoencoder, TinyResNet, example_input

__all__ = ["MODELS", "TinyResNet", "TiedAutoencoder", "DepthwiseClassifier", "example_input"]
