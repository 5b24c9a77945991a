"""Hook specifications added by pytest-trtrefit."""
from __future__ import annotations


def pytest_trt_refit_models():
    """Declare models to check, in a ``conftest.py``: return ``{name: spec}``.

    ``spec`` is ``(factory, example_inputs)``, ``(factory, example_inputs, options)`` or a dict
    with the keys ``factory``, ``inputs`` and any options. ``factory`` builds the model (a class or
    a function taking no arguments); ``example_inputs`` is a tensor or a tuple of tensors. Options:
    ``checks`` (any of "weights", "perturbations", "sequences"; default all three), ``examples``,
    ``paths``, ``rtol``, ``atol``, ``scales``, ``specials``, ``max_specials``, ``input_families``
    (families for a second, generated input sample; ``()`` checks the example inputs only).

    pytest-trtrefit generates one property test per model and check from this, with no test code;
    they run with ``--trt-refit``.
    """
