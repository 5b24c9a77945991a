"""Built-in converters, one module per op family; importing registers them."""
from . import (activation, attention, casts, conv, elementwise, indexing, logical, matmul, normalization, pooling,  # noqa: F401
               reduce, shape)
