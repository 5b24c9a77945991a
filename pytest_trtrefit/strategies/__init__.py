"""Hypothesis strategies for refit checks: weight sets, perturbations, refit sequences and inputs.

Hypothesis draws only the *structure* of a weight set (a seed, a scale family, a few special values
aimed at named tensors) and torch materialises the tensors from it. Drawing a handful of integers
and choices keeps generation fast for real models and makes shrinking end at a small, readable
example such as ``state_dicts(seed=0, scale='fan_in', specials=[('bn.running_var', 'var_near_eps')])``
instead of thousands of floats.

Example::

    from hypothesis import given
    from pytest_trtrefit.strategies import state_dicts, refit_settings

    @refit_settings()
    @given(weights=state_dicts(MyNet()))
    def test_refit(trt_refit, weights):
        trt_refit.check(MyNet, weights, torch.randn(1, 3, 32, 32))

The same draw without Hypothesis (scripts, benchmarks, fixed test data) is :func:`weight_set`, the
one materializer every strategy here uses; :func:`perturb` moves an existing state_dict the way
:func:`perturbations` does::

    net = MyNet()
    net.load_state_dict(weight_set(net, seed=1, specials=[("bn.running_var", "var_near_eps")]))
    tuned = perturb(net.state_dict(), seed=2, magnitude=1e-2)

The modules, by family: :mod:`.weights` (``state_dicts``, ``weight_set``), :mod:`.specials` (special
values and where they apply), :mod:`.perturbations`, :mod:`.sequences`, :mod:`.inputs`,
:mod:`.shapes` (shapes inside shape ranges), :mod:`.materialize` (the one materializer) over
:mod:`.layout` (a model's state_dict layout), :mod:`.recipes` (the drawn values, printed as their
recipes), :mod:`.settings` and :mod:`.validation` (the one argument check: every invalid argument
raises :class:`InvalidStrategyArgument`, Hypothesis's ``InvalidArgument``).
"""
from __future__ import annotations

from .inputs import INPUT_FAMILIES, boundary_samples, inputs
from .materialize import SCALES
from .perturbations import PERTURBATIONS, perturb, perturbations
from .recipes import InputCall, InputSample, WeightSequence, WeightSet
from .sequences import refit_sequences
from .settings import refit_settings
from .shapes import profile_shapes
from .specials import ALL_SPECIALS, LARGE, PRECISION_SPECIALS, SPECIALS, TINY, dtype_limits, special_targets
from .validation import InvalidStrategyArgument
from .weights import state_dicts, weight_set

__all__ = ["state_dicts", "perturbations", "refit_sequences", "inputs", "profile_shapes", "boundary_samples",
           "refit_settings", "weight_set", "perturb", "special_targets", "WeightSet", "InputSample", "InputCall",
           "WeightSequence", "SCALES", "SPECIALS", "PRECISION_SPECIALS", "ALL_SPECIALS", "PERTURBATIONS",
           "INPUT_FAMILIES", "LARGE", "TINY", "dtype_limits", "InvalidStrategyArgument"]
