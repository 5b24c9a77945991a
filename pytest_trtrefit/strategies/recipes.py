"""The values the strategies draw, each printed (also by Hypothesis's pretty printer) as the recipe
that made it, never as its tensors: ``state_dicts(seed=0, scale='fan_in', specials=[])``."""
from __future__ import annotations

from refitcore.capture.structured import Inputs

__all__ = ["SEED_MAX", "Described", "WeightSet", "WeightSequence", "InputSample", "InputCall"]

SEED_MAX = 2 ** 16 - 1     # seeds drawn by every strategy: small, so a shrunk example reads well


class Described:
    """Printed as the recipe that made it (``description``), not its tensors."""

    description: str

    def describe(self) -> str:
        return self.description

    def __repr__(self) -> str:
        return self.description

    def _repr_pretty_(self, p, cycle) -> None:   # Hypothesis's printer
        p.text(self.description)


class WeightSet(Described, dict):
    """A generated state_dict; its repr is the recipe that made it, not its tensors."""

    def __init__(self, tensors: dict, description: str, **meta):
        super().__init__(tensors)
        self.description = description
        self.meta = meta


class WeightSequence(Described, list):
    """Weight sets to refit one after another; its repr names the steps (``A``, ``B``, ``A again``)."""

    def __init__(self, steps: list, labels: list[str], description: str):
        super().__init__(steps)
        self.labels = labels
        self.description = description


class InputSample(Described, tuple):
    """A tuple of input tensors; its repr is the recipe that made it."""

    def __new__(cls, tensors, description: str):
        obj = super().__new__(cls, tensors)
        obj.description = description
        return obj


class InputCall(Described, Inputs):
    """One drawn call with keyword inputs (a :class:`refitcore.Inputs`); its repr is the recipe."""

    def __init__(self, args, kwargs, description: str):
        super().__init__(*args, **kwargs)
        self.description = description
