"""Random weight sets for a model's architecture: :func:`state_dicts` (a Hypothesis strategy) and
:func:`weight_set` (the same draw without Hypothesis)."""
from __future__ import annotations

import math
from collections.abc import Sequence

from hypothesis import strategies as st

from .layout import layout_of
from .materialize import SCALES, materialize
from .recipes import SEED_MAX, WeightSet
from .specials import ALL_SPECIALS, SPECIALS, targets
from .validation import check_argument, check_one_of, check_precision, check_some_of

__all__ = ["DEFAULT_SCALES", "weight_set", "state_dicts"]

DEFAULT_SCALES = ("fan_in", "fan_in_uniform", "he")   # 'unit' blows up deep nets: opt in


def weight_set(model, *, seed: int = 0, scale: str = "fan_in", gain: float = 1.0,
               specials: Sequence[tuple[str, str]] = (), keep_integers: bool = False,
               precision: str = "fp32") -> WeightSet:
    """One random state_dict for ``model``'s architecture (an ``nn.Module`` or a callable returning
    one): the draw :func:`state_dicts` makes for this seed, scale family and specials.

    Weights are drawn from the ``scale`` family (:data:`SCALES`: ``fan_in`` normal with std
    1/sqrt(fan_in), ``fan_in_uniform`` with the same variance, ``he`` with std sqrt(2/fan_in),
    ``unit``), biases uniform in +-1/sqrt(fan_in); ``gain`` multiplies both (``gain=1e-3`` for tiny
    activations, ``gain=8`` for large ones). BatchNorm statistics stay valid (variance >= 0),
    normalisation weights stay near 1, tied parameters share one tensor. ``specials`` are
    ``(key, kind)`` pairs from :func:`special_targets` (kinds in :data:`SPECIALS`, or the dtype-limit
    kinds of :data:`PRECISION_SPECIALS`, aimed at ``precision``'s dtype: 'fp32', 'fp16' or 'bf16'),
    applied in order.
    ``num_batches_tracked`` is drawn at random unless ``keep_integers``, which keeps the model's own;
    other integer and bool buffers always keep the model's values.

    Example::

        net = torchvision.models.resnet18()
        w = weight_set(net, seed=3, scale="he", specials=[("bn1.running_var", "var_near_eps")])
        net.load_state_dict(w)      # w is a plain state_dict (a dict subclass printed as its recipe)
    """
    check_one_of("scale", scale, SCALES)
    check_argument(isinstance(gain, (int, float)) and math.isfinite(gain) and gain > 0,
                   f"gain={gain!r}: give a finite number > 0")
    precision = check_precision("precision", precision)
    layout = layout_of(model)
    specials = [tuple(s) for s in specials]
    allowed = set(targets(layout, ALL_SPECIALS))
    bad = [s for s in specials if s not in allowed]
    check_argument(not bad, f"specials={bad!r}: not applicable to this model; see special_targets(model)")
    text = f"weight_set(seed={seed}, scale={scale!r}" + (f", gain={gain:g}" if gain != 1.0 else "") + \
        f", specials={specials!r}" + _precision_text(precision) + ")"
    return WeightSet(materialize(layout, seed, scale, specials, gain=gain, keep_integers=keep_integers,
                                 precision=precision), text,
                     seed=seed, scale=scale, gain=gain, specials=specials, precision=precision)


def _precision_text(precision: str) -> str:
    return f", precision={precision!r}" if precision != "fp32" else ""


def state_dicts(model, *, scales: Sequence[str] = DEFAULT_SCALES, specials: Sequence[str] = SPECIALS,
                max_specials: int = 3, precision: str = "fp32") -> st.SearchStrategy[WeightSet]:
    """Random weight sets for ``model``'s architecture (an ``nn.Module`` or a callable returning one).

    Draws a seed, a scale family (``scales``, fan-in scaled by default so deep nets stay finite) and up
    to ``max_specials`` special values aimed at named tensors: ``zeros``, ``large`` (x100), ``tiny``
    (x1e-6), ``sign_flip``, ``negative_gamma`` (BatchNorm), ``var_near_eps`` (BatchNorm running_var
    in [0, 2*eps]); opt in (``specials=SPECIALS + PRECISION_SPECIALS``): ``dtype_max``,
    ``dtype_min_normal``, ``dtype_subnormal``, values at the limits of ``precision``'s dtype ('fp32',
    'fp16' or 'bf16': its largest finite value, smallest normal, subnormals). BatchNorm statistics
    stay valid (variance >= 0), ``num_batches_tracked`` and other integer buffers stay integers, tied
    parameters get identical values. Shrinks towards seed 0, the first scale family and no specials.

    Example::

        @given(weights=state_dicts(torchvision.models.resnet18()))
        def test_resnet(trt_refit, weights): ...

        # weights at float16's limits, for a float16 engine's range validation
        near_limits = state_dicts(net, specials=PRECISION_SPECIALS, precision="fp16")
    """
    check_some_of("scales", scales, SCALES)
    check_some_of("specials", specials, ALL_SPECIALS, allow_empty=True)
    check_argument(isinstance(max_specials, int) and max_specials >= 0,
                   f"max_specials={max_specials!r}: give a number >= 0")
    precision = check_precision("precision", precision)
    layout = layout_of(model)
    chosen_from = targets(layout, specials)

    @st.composite
    def _draw(draw) -> WeightSet:
        seed = draw(st.integers(0, SEED_MAX))
        scale = draw(st.sampled_from(tuple(scales)))
        # Fixed slots, each empty or one special: every slot shrinks to empty on its own, so a
        # failing example ends with only the specials it needs.
        slots = [draw(st.none() | st.sampled_from(chosen_from)) for _ in range(max_specials)] if chosen_from else []
        chosen = list(dict.fromkeys(s for s in slots if s is not None))
        text = f"state_dicts(seed={seed}, scale={scale!r}, specials={chosen!r}{_precision_text(precision)})"
        return WeightSet(materialize(layout, seed, scale, chosen, precision=precision), text, seed=seed, scale=scale,
                         specials=chosen, precision=precision)

    return _draw()
