"""Built-in converters, one module per op family; importing registers them."""
from refitcore.conversion.converters import (activation, attention, casts, conv, elementwise, indexing, logical,  # noqa: F401
               matmul, normalization, pooling, reduce, resize, shape, shape_dynamic)
