"""The compile options: one frozen record built once from ``refitcore.compile``'s keyword arguments.

It is passed down to the engine kinds' builds, it is what the engine cache's key hashes
(:meth:`CompileOptions.key_fields`, with the backend and the precision as key parts of their own),
and it is stored with the engine (:meth:`CompileOptions.to_json`, the bundle header's
``options``), as Torch-TensorRT keeps its ``CompilationSettings``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from refitcore.options import COMPILERS, DEFAULT_COMPILER
from refitcore.partition.partitioner import DEFAULT_MIN_BLOCK_SIZE, executed_op_names

__all__ = ["CompileOptions", "COMPILERS", "DEFAULT_COMPILER"]


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """How a model is compiled (see :func:`refitcore.compile` for each option).

    ``torch_executed_ops`` are kept as their canonical names, however spelt
    (:func:`refitcore.partition.partitioner.executed_op_names`: :class:`ValueError` naming any that
    is no operator), and ``submodules`` as a tuple. ``dynamic_shapes`` and ``profiles`` are the arguments as given
    (torch.export ``Dim`` objects are no data): a saved engine keeps their resolved ranges in its
    IO spec (:class:`refitcore.engine.records.IOSpec` ``profiles``) instead.

    ``compiler``: whose pipeline builds the engine, ``"refitcore"`` (ours) or ``"torch_tensorrt"``
    (:mod:`refitcore.engine.torch_tensorrt`); ``compiler_settings``: that compiler's own settings
    passed through (Torch-TensorRT's ``CompilationSettings`` fields), kept as a dict. The compiler
    enters the cache key and the saved options only when not the default (keys and files of
    refitcore's own engines are what they were); the settings enter the key as text and are not
    saved (Torch-TensorRT engines are not saved as refitcore files).

    ``strip_engine_weights``: compile returns a weightless engine (TensorRT's weight-stripped plan,
    Torch-TensorRT's setting of that name): built from the model's weights without a copy of them,
    saved without them, refitted before it runs. Not a key field (the engine is the same)."""

    backend: str = "auto"
    precision: str = "fp32"
    strict: bool = False
    torch_executed_ops: Iterable[Any] = ()   # kept as a sorted tuple of names
    min_block_size: int = DEFAULT_MIN_BLOCK_SIZE
    submodules: Sequence[str] | None = None   # kept as a tuple
    dynamic_shapes: Any = None
    profiles: Sequence[Any] | None = None
    model_factory: str | None = None
    verbose: bool = False
    compiler: str = DEFAULT_COMPILER
    compiler_settings: Mapping[str, Any] | None = None   # kept as a dict
    strip_engine_weights: bool = False

    def __post_init__(self) -> None:
        if self.compiler not in COMPILERS:
            raise ValueError(f"compiler must be one of {list(COMPILERS)}, got {self.compiler!r}")
        if self.compiler_settings and self.compiler == DEFAULT_COMPILER:
            raise TypeError(f"compile() got settings {sorted(self.compiler_settings)} that refitcore's compiler does "
                            f"not take (they are Torch-TensorRT's: pass compiler='torch_tensorrt')")
        object.__setattr__(self, "compiler_settings", dict(self.compiler_settings or {}))
        object.__setattr__(self, "torch_executed_ops", executed_op_names(self.torch_executed_ops))
        if self.submodules is not None:
            object.__setattr__(self, "submodules", tuple(self.submodules))

    def _compiler_fields(self, *, settings: bool) -> dict[str, Any]:
        """The compiler (not the default) and, with ``settings``, its settings as text (for the key)."""
        if self.compiler == DEFAULT_COMPILER:
            return {}
        if not settings:
            return {"compiler": self.compiler}
        return {"compiler": self.compiler, "compiler_settings": {k: repr(v) for k, v in
                                                                  sorted((self.compiler_settings or {}).items())}}

    def key_fields(self) -> dict[str, Any]:
        """The options besides backend and precision that change the engine: what the cache key
        hashes as its ``options`` part (:func:`refitcore.cache.key.compile_key`)."""
        return {"strict": self.strict, "torch_executed_ops": list(self.torch_executed_ops),
                "min_block_size": self.min_block_size,
                "submodules": list(self.submodules) if self.submodules is not None else None,
                "profiles": self.profiles, **self._compiler_fields(settings=True)}

    def to_json(self) -> dict[str, Any]:
        """The options as data (without ``dynamic_shapes``/``profiles``: see the class doc)."""
        return {"backend": self.backend, "precision": self.precision, "strict": self.strict,
                "torch_executed_ops": list(self.torch_executed_ops), "min_block_size": self.min_block_size,
                "submodules": list(self.submodules) if self.submodules is not None else None,
                "model_factory": self.model_factory, "verbose": self.verbose, **self._compiler_fields(settings=False),
                **({"strip_engine_weights": True} if self.strip_engine_weights else {})}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CompileOptions:
        """The options of :meth:`to_json`; :class:`TypeError` or :class:`ValueError` on other data (a
        file is untrusted input)."""
        if not isinstance(d, Mapping):
            raise TypeError(f"options should be an object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls().to_json()) - {"compiler", "strip_engine_weights"})
        if unknown:
            raise ValueError(f"options has unknown fields {unknown[:5]}")
        want = {"backend": (str,), "precision": (str,), "strict": (bool,), "torch_executed_ops": (list,),
                "min_block_size": (int,), "submodules": (list, type(None)), "model_factory": (str, type(None)),
                "verbose": (bool,), "compiler": (str,), "strip_engine_weights": (bool,)}
        for name, value in d.items():
            kinds = want[name]
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise TypeError(f"options.{name} should be {' or '.join(k.__name__ for k in kinds)}, "
                                f"got {type(value).__name__}")
        for name in ("torch_executed_ops", "submodules"):
            if any(not isinstance(v, str) for v in d.get(name) or ()):
                raise TypeError(f"options.{name} should list strings")
        return cls(**d)
