"""Built-in converters, one module per op family; importing registers them."""
from . import activation, conv, elementwise, matmul, normalization, pooling, shape  # noqa: F401
