"""Built-in converters, one module per op family; importing registers them."""
from refitcore.conversion.converters import (
    activation,
    attention,
    casts,
    conv,
    elementwise,
    indexing,
    logical,
    matmul,
    normalization,
    pooling,
    recurrent,
    reduce,
    resize,
    shape,
    shape_dynamic,
)

# the op families, each registered on import
__all__ = ["activation", "attention", "casts", "conv", "elementwise", "indexing", "logical", "matmul",
           "normalization", "pooling", "recurrent", "reduce", "resize", "shape", "shape_dynamic"]
