"""Built-in converters, one module per op family; importing registers them."""
from . import activation, attention, conv, elementwise, matmul, normalization, pooling, reduce, shape  # noqa: F401
