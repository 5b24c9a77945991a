"""Several checkpoints in a row for one engine: :func:`refit_sequences`."""
from __future__ import annotations

from hypothesis import strategies as st

from .perturbations import perturbations
from .recipes import WeightSequence, WeightSet
from .validation import check_argument
from .weights import state_dicts

__all__ = ["refit_sequences"]


def refit_sequences(model, *, min_size: int = 2, max_size: int = 4, end_with_first: bool = True,
                    **state_dict_options) -> st.SearchStrategy[WeightSequence]:
    """Several checkpoints in a row for one engine: fresh weight sets, perturbations of the previous
    step and repeats of an earlier step. With ``end_with_first`` (default) the sequence returns to its
    first weight set at the end, so A -> ... -> A must reproduce A's outputs exactly.
    ``state_dict_options`` are :func:`state_dicts`'s (``scales``, ``specials``, ``max_specials``)."""
    check_argument(1 <= min_size <= max_size,
                   f"min_size={min_size}, max_size={max_size}: need 1 <= min_size <= max_size")
    fresh = state_dicts(model, **state_dict_options)

    @st.composite
    def _draw(draw) -> WeightSequence:
        steps, names, text = [draw(fresh)], ["A"], []
        text.append(f"A={steps[0].describe()}")
        n = draw(st.integers(min_size, max_size)) - (1 if end_with_first else 0)
        for _ in range(1, max(1, n)):
            move = draw(st.sampled_from(("perturb", "fresh", "repeat")))
            if move == "repeat":
                j = draw(st.integers(0, len(steps) - 1))
                steps.append(steps[j])
                names.append(names[j])
                text.append(f"{names[j]} again")
                continue
            new = draw(perturbations(steps[-1])) if move == "perturb" else draw(fresh)
            name = chr(ord("A") + len(set(names)))
            if move == "perturb":
                new = WeightSet(new, f"{new.describe().split(' of ')[0]} of {names[-1]}")
            steps.append(new)
            names.append(name)
            text.append(f"{name}={new.describe()}")
        if end_with_first:
            steps.append(steps[0])
            names.append("A")
            text.append("A again")
        return WeightSequence(steps, names, "refit_sequences([" + ", ".join(text) + "])")

    return _draw()
