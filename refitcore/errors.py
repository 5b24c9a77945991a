"""Exceptions. User errors (unsupported model, wrong weights, other architecture) are
separate from internal bugs; every message says what was seen and what to do."""
from __future__ import annotations

__all__ = [
    "RefitCoreError",
    "UnsupportedOperatorError",
    "ExportError",
    "PackedSequenceError",
    "MutationError",
    "ArchitectureMismatchError",
    "WeightMappingError",
    "MapCannotServeError",
    "RefitError",
    "BundleError",
    "BundleContentError",
    "BackendUnavailableError",
    "ShapeRangeError",
    "WeightlessEngineError",
]


class RefitCoreError(Exception):
    """Base class of every error refitcore raises on purpose."""


class UnsupportedOperatorError(RefitCoreError):
    """The model uses operators that have no converter. ``.ops`` lists every one of them
    as (aten target, module path, node name), found in a single pass."""

    def __init__(self, ops: list[tuple[str, str, str]]):
        self.ops = list(ops)
        lines = [f"  - {target} at {path or '<top level>'} (node {node})" for target, path, node in self.ops]
        targets = sorted({t for t, _, _ in self.ops})
        super().__init__(
            f"{len(self.ops)} operator call(s) of {len(targets)} kind(s) have no converter:\n"
            + "\n".join(lines)
            + "\nAdd a converter with @refitcore.conversion.converter(<aten overload>) or change the model."
        )


class ExportError(RefitCoreError):
    """torch.export could not export a module: names the module path and the cause's first line."""

    def __init__(self, path: str, cause: BaseException):
        self.path = path
        text = str(cause).strip().splitlines()
        self.cause_line = f"{type(cause).__name__}: {text[0] if text else ''}"
        super().__init__(
            f"torch.export cannot export {path or 'the model'}: {self.cause_line}\n"
            f"(data-dependent control flow? compile without strict=True to compile the submodules that do "
            f"export and run the rest eagerly, or pass submodules=[...] naming them)")


class PackedSequenceError(ExportError):
    """A packed sequence (``torch.nn.utils.rnn.pack_padded_sequence``, ``aten._pack_padded_sequence``)
    feeds a recurrent module: its per-step batch sizes are computed from the lengths' values, which
    torch.export cannot trace and no engine of fixed shapes can take. ``.modules``: (path, class)."""

    def __init__(self, modules: list[tuple[str, str]], cause: BaseException):
        self.modules = list(modules)
        self.path = modules[0][0] if modules else ""
        text = str(cause).strip().splitlines()
        self.cause_line = f"{type(cause).__name__}: {text[0] if text else ''}"
        where = ", ".join(f"{cls} at {path or '<top level>'}" for path, cls in self.modules)
        RefitCoreError.__init__(
            self,
            f"torch.export cannot export the model: a packed sequence (nn.utils.rnn.pack_padded_sequence, "
            f"aten._pack_padded_sequence) feeds {where}; its step sizes depend on the lengths' values, which an "
            f"engine cannot take\n(pass the padded tensor to the recurrent module instead, padding at the end: the "
            f"engine runs it over the padded length, so mask the outputs past each length and read each sequence's "
            f"last state from the output at its length - 1; or pass submodules=[...] naming the modules to compile "
            f"and keep the packed recurrence in PyTorch)")


class MutationError(RefitCoreError):
    """``forward`` writes into one of its inputs or buffers (``x.add_(1)``, ``self.count += 1``),
    which an engine cannot do: it computes outputs only. ``.inputs`` and ``.buffers`` name them."""

    def __init__(self, inputs: list[str], buffers: list[str]):
        self.inputs, self.buffers = list(inputs), list(buffers)
        what = [f"input {n!r}" for n in self.inputs] + [f"buffer {n!r}" for n in self.buffers]
        super().__init__(
            f"forward mutates {', '.join(what)} in place, which an engine cannot do (it computes outputs, it "
            f"writes nothing back)\n(clone an input before changing it, or return the updated value instead of "
            f"storing it; compiled without strict=True, a module that mutates runs eagerly and its submodules "
            f"are compiled)")


class WeightMappingError(RefitCoreError, ValueError):
    """A state_dict cannot be turned into engine weights (missing key, wrong shape/dtype,
    non-finite values, tied weights that differ). ``.problems`` lists every problem."""

    def __init__(self, problems: list[str], *, header: str = "cannot map the new weights onto the engine"):
        self.problems = list(problems)
        shown = self.problems[:50]
        more = len(self.problems) - len(shown)
        body = "\n".join(f"  - {p}" for p in shown) + (f"\n  ... and {more} more" if more > 0 else "")
        super().__init__(f"{header} ({len(self.problems)} problem(s)):\n{body}")


class ArchitectureMismatchError(WeightMappingError):
    """The new weights or graph do not fit the compiled architecture (missing keys, other shapes, a
    different graph): recompile needed. ``.problems`` lists every difference found."""

    def __init__(self, problems: list[str]):
        super().__init__(problems, header="the new weights do not fit the compiled architecture; recompile needed")


class MapCannotServeError(WeightMappingError):
    """The weight map cannot express the new model (a tensor constant outside the state_dict is
    missing or has another size): the cached path cannot serve it, converting again can (the
    fallback path; ``refit(path="auto")`` takes it)."""

    def __init__(self, problems: list[str]):
        super().__init__(problems, header="the weight map cannot serve these weights; use the fallback path")


class RefitError(RefitCoreError):
    """The refitter rejected the weights; the engine was restored to its previous weights."""

    def __init__(self, problems: list[str], *, rolled_back: bool = True):
        self.problems = list(problems)
        self.rolled_back = rolled_back
        state = ("the engine still answers with its previous weights" if rolled_back
                 else "ROLLBACK FAILED: the engine's weights are in an unknown state; reload it")
        shown = "\n".join(f"  - {p}" for p in self.problems[:50])
        super().__init__(f"refit failed ({len(self.problems)} problem(s)); {state}:\n{shown}")


class BundleError(RefitCoreError):
    """A saved engine file is truncated, corrupted, or of an unsupported version."""


class BundleContentError(BundleError, ValueError):
    """What a file holds is refused, whatever its checksums: an op outside the allowlist
    (:mod:`refitcore.conversion.allowed_ops`), a shape beyond the bounds, an unknown recipe or operand
    kind, a bad dtype or index. The message names the op or value and where it is in the file."""


class WeightlessEngineError(RefitCoreError):
    """A weightless engine (loaded without its weights, e.g. from the engine cache) was run before a
    refit set its weights."""


class BackendUnavailableError(RefitCoreError):
    """The requested backend cannot run here; the message says why."""

    # TensorRT's own words when it refused (the TensorRT backend sets them), for the capability probe
    tensorrt_messages: list[str] | None = None


class ShapeRangeError(RefitCoreError, ValueError):
    """An input shape outside every optimization profile of a dynamic-shape engine, or an unusable
    shape-range specification; the message names the input, the dimension and the range."""
