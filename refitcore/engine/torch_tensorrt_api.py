"""Every Torch-TensorRT entry point refitcore uses, in one place.

The CPU harness of :mod:`refitcore.engine.torch_tensorrt` runs Torch-TensorRT's own pipeline up to
the TensorRT network (its lowering, its partitioner, its ``TRTInterpreter``) and its own refit
code, without building an engine. Those steps are private Torch-TensorRT functions: they are
imported here only, checked against the versions they were tested with
(:data:`TESTED_VERSIONS`), and a missing one fails with a
:class:`TorchTensorRTUnavailableError` naming it.

Private entry points (``torch_tensorrt.dynamo...``):

- ``_settings.CompilationSettings``: the settings users pass to ``torch_tensorrt.dynamo.compile``;
- ``lowering.pre_export_lowering``, ``lowering.get_decompositions``, ``lowering.post_lowering``:
  the lowering of ``compile`` and ``refit_module_weights`` before partitioning;
- ``partitioning.get_graph_converter_support``, ``partitioning.fast_partition``,
  ``partitioning.construct_submodule_inputs``: the partition into ``_run_on_acc_N`` (TensorRT) and
  ``_run_on_gpu_N`` (PyTorch) submodules and each submodule's inputs;
- ``conversion._ConverterRegistry.DYNAMO_CONVERTERS``, ``conversion._conversion.infer_module_output_dtypes``,
  ``conversion._TRTInterpreter.TRTInterpreter`` (``_construct_trt_network_def``, ``ctx.net``,
  ``ctx.weight_refit_map``, ``_cur_node``, ``_cur_node_name``): one submodule's TensorRT network;
- ``_refit.construct_refit_mapping``, ``_refit._refit_single_trt_engine_with_gm``: the refit of
  ``refit_module_weights``, one engine at a time (its module global ``trt`` gives it
  ``trt.Refitter``, replaced here for the duration of one call by a stand-in);
Not used: ``_refit.construct_refit_mapping_from_weight_name_map``, the cached weight-name-map path
of 2.10 to 2.12 (removed in 2.13 by upstream PR #4342; those versions' refit also calls ``.cuda()``).

Import on a machine without a CUDA device: two calls Torch-TensorRT makes while importing and
while making its settings (``torch.cuda.get_device_capability`` by ``is_tegra_platform()``, and
``torch.cuda.current_device`` by the default device of ``CompilationSettings``) fail there.
:func:`cpu_scope` replaces both (a compute capability of 9.0, device 0) for the duration of the
import and of each call made through this module, only when ``torch.cuda.is_available()`` is
False, and restores them afterwards: nothing outside those calls sees the patches.

The module imports without Torch-TensorRT: it is imported at the first call (:func:`load`).
Importing it replaces ``sys.modules["tensorrt"]`` by a proxy of the TensorRT it uses
(``tensorrt_rtx`` for Torch-TensorRT-RTX); :func:`load` lets :mod:`refitcore._trt` choose refitcore's
TensorRT before that, so refitcore's backends see the same module either way.

Public API (``backend='tensorrt'``, on a CUDA device; :meth:`TorchTensorRT.compile_engine`,
:meth:`TorchTensorRT.refit_module`, :meth:`TorchTensorRT.read_engine`,
:meth:`TorchTensorRT.write_engine`): ``torch_tensorrt.dynamo.compile(exported_program, inputs,
immutable_weights=False, ...)``; each ``_run_on_acc_N`` submodule's TensorRT engine is its
``.engine.cuda_engine`` (the ``TRTEngine`` of Torch-TensorRT's Python runtime; an engine of its C++
runtime, ``torch.classes.tensorrt.Engine``, does not expose it and is refused with that reason,
:data:`CPP_RUNTIME`); ``torch_tensorrt.dynamo.refit_module_weights(compiled_module,
new_weight_module, arg_inputs=..., in_place=False, verify_output=False, use_weight_map_cache=False)``
(the keyword arguments the installed version accepts); TensorRT's ``trt.Refitter(engine, logger)``
(``get_all_weights``, ``get_named_weights``, ``set_named_weights``, ``refit_cuda_engine``) reads and
writes an engine's weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
from unittest import mock

import torch

from refitcore import _trt
from refitcore.errors import RefitCoreError

__all__ = ["TESTED_VERSIONS", "DISTRIBUTIONS", "TorchTensorRTUnavailableError", "TorchTensorRT", "load", "available",
           "cpu_scope", "NetworkBuild", "WEIGHT_MAP_CACHE_REMOVED", "NO_NAMED_WEIGHTS",
           "CPP_RUNTIME"]

# Versions of the CPU harness's private entry points that the test-suite ran against.
TESTED_VERSIONS = ("2.14.0",)
# The distributions that provide the ``torch_tensorrt`` package (full TensorRT, TensorRT-RTX).
DISTRIBUTIONS = ("torch-tensorrt", "torch-tensorrt-rtx")
WEIGHT_MAP_CACHE_REMOVED = ("Torch-TensorRT {version} has no cached refit path: its weight-name map "
                            "(construct_refit_mapping_from_weight_name_map, use_weight_map_cache) was removed in "
                            "2.13 by upstream PR #4342 (it exists in 2.10 to 2.12); refit through path='fallback' "
                            "(construct_refit_mapping, what refit_module_weights does) or path='auto'")
CPP_RUNTIME = ("the compiled module's {segment} runs on Torch-TensorRT's C++ runtime ({kind}), whose TensorRT "
               "engine Python cannot reach to read and write its weights; refitcore drives engines of "
               "Torch-TensorRT's Python runtime (TRTEngine, used where the C++ runtime is not installed)")
NO_NAMED_WEIGHTS = ("TensorRT {version}'s Refitter has no get_named_weights: the weights of Torch-TensorRT's "
                    "engines cannot be read back for the audit; install TensorRT 10.1 or newer")

# (module, attribute) of every private entry point; the attribute None: the module itself.
_ENTRY_POINTS = {
    "CompilationSettings": ("torch_tensorrt.dynamo._settings", "CompilationSettings"),
    "pre_export_lowering": ("torch_tensorrt.dynamo.lowering", "pre_export_lowering"),
    "get_decompositions": ("torch_tensorrt.dynamo.lowering", "get_decompositions"),
    "post_lowering": ("torch_tensorrt.dynamo.lowering", "post_lowering"),
    "get_graph_converter_support": ("torch_tensorrt.dynamo.partitioning", "get_graph_converter_support"),
    "fast_partition": ("torch_tensorrt.dynamo.partitioning", "fast_partition"),
    "construct_submodule_inputs": ("torch_tensorrt.dynamo.partitioning", "construct_submodule_inputs"),
    "DYNAMO_CONVERTERS": ("torch_tensorrt.dynamo.conversion._ConverterRegistry", "DYNAMO_CONVERTERS"),
    "infer_module_output_dtypes": ("torch_tensorrt.dynamo.conversion._conversion", "infer_module_output_dtypes"),
    "TRTInterpreter": ("torch_tensorrt.dynamo.conversion._TRTInterpreter", "TRTInterpreter"),
    "refit_module": ("torch_tensorrt.dynamo._refit", None),
    "construct_refit_mapping": ("torch_tensorrt.dynamo._refit", "construct_refit_mapping"),
    "refit_single_engine": ("torch_tensorrt.dynamo._refit", "_refit_single_trt_engine_with_gm"),
}


class TorchTensorRTUnavailableError(RefitCoreError):
    """Torch-TensorRT cannot be used here: not installed, an untested version, or a private entry
    point the CPU harness needs is missing (the message names it)."""


def _cuda_missing() -> bool:
    return not torch.cuda.is_available()


@contextlib.contextmanager
def cpu_scope() -> Iterator[None]:
    """Within: ``torch.cuda.get_device_capability`` and ``torch.cuda.current_device`` answer as a
    device 0 of compute capability 9.0 would, when no CUDA device is present (see the module
    docstring); a no-op on a machine with one."""
    if not _cuda_missing():
        yield
        return
    with mock.patch.object(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0)), \
            mock.patch.object(torch.cuda, "current_device", lambda *a, **k: 0):
        yield


def installed_version() -> str | None:
    """The installed Torch-TensorRT distribution's version, None when none is installed."""
    for dist in DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@dataclasses.dataclass
class NetworkBuild:
    """One ``_run_on_acc_N`` submodule converted by ``TRTInterpreter``: the TensorRT ``network``,
    Torch-TensorRT's ``refit_map`` (engine weight name -> tensor) and, per engine weight name, the
    FX node that recorded it and that node's name as Torch-TensorRT gives it ('<module path>/<node>').
    The network's weights point into tensors the ``interpreter`` holds: read them while it lives."""

    network: Any
    refit_map: dict[str, torch.Tensor]
    nodes: dict[str, Any]
    node_names: dict[str, str]
    interpreter: Any


class _RecordingMap(dict):
    """``ctx.weight_refit_map`` that also notes the node being converted when a weight is recorded."""

    def __init__(self, interpreter: Any):
        super().__init__()
        self.interpreter = interpreter
        self.nodes: dict[str, Any] = {}
        self.node_names: dict[str, str] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        self.nodes[key] = getattr(self.interpreter, "_cur_node", None)
        self.node_names[key] = getattr(self.interpreter, "_cur_node_name", None) or ""
        super().__setitem__(key, value)


class _TrtWithRefitter:
    """The ``tensorrt`` module as ``_refit_single_trt_engine_with_gm`` sees it during one call: every
    attribute is TensorRT's but ``Refitter``, which makes the given stand-in for the engine passed."""

    def __init__(self, trt: Any, make_refitter: Callable[[Any], Any]):
        self._trt = trt
        self._make = make_refitter

    def Refitter(self, engine: Any, logger: Any = None) -> Any:
        return self._make(engine)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trt, name)


class TorchTensorRT:
    """The loaded entry points (:func:`load`); ``package``: the ``torch_tensorrt`` package itself (its
    public API: ``load().package.Input(min_shape=..., opt_shape=..., max_shape=...)``; on a machine
    without a CUDA device, ``import torch_tensorrt`` itself fails unless :func:`load` ran first)."""

    def __init__(self, version: str, package: Any, entry: Mapping[str, Any]):
        self.version = version
        self.package = package
        self._entry = dict(entry)

    def settings(self, **settings: Any) -> Any:
        """``CompilationSettings`` for a refittable engine whose weights stay on the host
        (``immutable_weights=False``, ``offload_module_to_cpu=True``) and the caller's ``settings``;
        :class:`TypeError` naming a setting Torch-TensorRT does not have."""
        fields = {f.name for f in dataclasses.fields(self._entry["CompilationSettings"])}
        unknown = sorted(set(settings) - fields)
        if unknown:
            raise TypeError(f"Torch-TensorRT {self.version} has no compilation setting {unknown}; "
                            f"its settings: {sorted(fields)}")
        base = {"immutable_weights": False, "offload_module_to_cpu": True}
        base.update(settings)
        with cpu_scope():
            return self._entry["CompilationSettings"](**base)

    def lower(self, exported: torch.export.ExportedProgram, settings: Any) -> torch.fx.GraphModule:
        """The lowering of ``torch_tensorrt.dynamo.compile`` and ``refit_module_weights`` before
        partitioning (pre-export lowering, decompositions, ``.module()``, post-lowering)."""
        e = self._entry
        with cpu_scope():
            ep = e["pre_export_lowering"](exported, settings)
            ep = ep.run_decompositions(e["get_decompositions"](
                settings.enable_experimental_decompositions, settings.decompose_attention,
                settings.use_distributed_mode_trace, use_fp32_acc=settings.use_fp32_acc))
            return e["post_lowering"](ep.module(), settings)

    def partition(self, gm: torch.fx.GraphModule, settings: Any) -> torch.fx.GraphModule:
        """Torch-TensorRT's fast partition of a lowered graph (as ``compile`` does it)."""
        e = self._entry
        with cpu_scope():
            e["DYNAMO_CONVERTERS"].set_compilation_settings(settings)
            supported, total = e["get_graph_converter_support"](gm, settings.torch_executed_ops)
            partitioned, _ = e["fast_partition"](gm, min_block_size=settings.min_block_size,
                                                 torch_executed_ops=settings.torch_executed_ops,
                                                 require_full_compilation=settings.require_full_compilation,
                                                 skip_fusion=supported == total)
        return partitioned

    def submodule_inputs(self, submodule: torch.nn.Module) -> list[Any]:
        """The ``torch_tensorrt.Input`` list of one partition submodule (min/opt/max shapes)."""
        with cpu_scope():
            return list(self._entry["construct_submodule_inputs"](submodule))

    def build_network(self, submodule: torch.nn.Module, inputs: Sequence[Any], settings: Any) -> NetworkBuild:
        """``TRTInterpreter``'s network of one ``_run_on_acc_N`` submodule, without an engine."""
        e = self._entry
        with cpu_scope():
            out_dtypes = e["infer_module_output_dtypes"](submodule, truncate_double=settings.truncate_double)
            interp = e["TRTInterpreter"](submodule, list(inputs), output_dtypes=out_dtypes,
                                         compilation_settings=settings)
            recording = _RecordingMap(interp)
            interp.ctx.weight_refit_map = recording
            interp._construct_trt_network_def()
        return NetworkBuild(interp.ctx.net, dict(recording), recording.nodes, recording.node_names, interp)

    def refit_mapping(self, submodule: torch.nn.Module, inputs: Sequence[Any], settings: Any) -> dict:
        """``construct_refit_mapping``: Torch-TensorRT's refit map (engine weight name -> tensor)."""
        with cpu_scope():
            return dict(self._entry["construct_refit_mapping"](submodule, list(inputs), settings))

    def refit_engine(self, submodule: torch.nn.Module, engine: Any, inputs: Sequence[Any], settings: Any,
                     make_refitter: Callable[[Any], Any]) -> None:
        """``_refit_single_trt_engine_with_gm(submodule, engine, inputs, settings)``, unchanged, with
        ``trt.Refitter(engine, logger)`` answered by ``make_refitter(engine)`` during the call."""
        module = self._entry["refit_module"]
        with cpu_scope(), mock.patch.object(module, "trt", _TrtWithRefitter(module.trt, make_refitter)):
            self._entry["refit_single_engine"](new_gm=submodule, old_engine=engine, input_list=list(inputs),
                                               settings=settings)

    # ---- the public API: Torch-TensorRT's own engines on a CUDA device (backend='tensorrt') -------
    def compile_engine(self, exported: torch.export.ExportedProgram, inputs: Sequence[Any],
                       settings: Mapping[str, Any]) -> torch.fx.GraphModule:
        """``torch_tensorrt.dynamo.compile(exported, inputs, immutable_weights=False, **settings)``: a
        refittable compiled module."""
        options = {"immutable_weights": False, **settings}
        return self.package.dynamo.compile(exported, list(inputs), **options)

    def refit_module(self, compiled: torch.fx.GraphModule, new_program: torch.export.ExportedProgram,
                     inputs: Sequence[Any]) -> torch.fx.GraphModule:
        """``torch_tensorrt.dynamo.refit_module_weights`` on a copy of ``compiled`` (``in_place=False``),
        its own output check off (refitcore audits every weight), its weight-name-map cache off (the
        fallback: a new interpretation of the new weights), with the keyword arguments the installed
        version accepts."""
        refit = self.package.dynamo.refit_module_weights
        accepted = inspect.signature(refit).parameters
        options = {"arg_inputs": tuple(inputs), "in_place": False, "verify_output": False,
                   "use_weight_map_cache": False}
        return refit(compiled, new_program, **{k: v for k, v in options.items() if k in accepted})

    @staticmethod
    def refitter(engine: Any) -> Any:
        """TensorRT's ``trt.Refitter(engine, logger)`` for one of Torch-TensorRT's engines (the
        ``tensorrt`` module Torch-TensorRT imported)."""
        trt = sys.modules["tensorrt"]
        return trt.Refitter(engine, trt.Logger(trt.Logger.WARNING))

    @staticmethod
    def weights(array: Any) -> Any:
        """``trt.Weights`` of a contiguous numpy array (which must outlive the refit)."""
        return sys.modules["tensorrt"].Weights(array)

    @staticmethod
    def cuda_engine(segment: str, submodule: torch.nn.Module) -> Any:
        """The TensorRT engine (``trt.ICudaEngine``) of one ``_run_on_acc_N`` submodule: its
        ``.engine.cuda_engine``; :class:`TorchTensorRTUnavailableError` (:data:`CPP_RUNTIME`) otherwise."""
        engine = getattr(submodule, "engine", None)
        cuda = getattr(engine, "cuda_engine", None)
        if cuda is None:
            raise TorchTensorRTUnavailableError(CPP_RUNTIME.format(segment=segment, kind=type(engine).__name__))
        return cuda

    def read_engine(self, engine: Any) -> dict[str, Any]:
        """``{name: numpy array (flat)}``: every refittable weight of ``engine`` as TensorRT's Refitter
        reads it back (``get_all_weights``, ``get_named_weights``)."""
        refitter = self.refitter(engine)
        if not hasattr(refitter, "get_named_weights"):
            raise TorchTensorRTUnavailableError(NO_NAMED_WEIGHTS.format(
                version=getattr(sys.modules["tensorrt"], "__version__", "?")))
        return {name: refitter.get_named_weights(name).numpy().copy() for name in refitter.get_all_weights()}

    def write_engine(self, engine: Any, arrays: Mapping[str, Any]) -> list[str]:
        """Set ``arrays`` ({name: numpy array}) into ``engine`` through TensorRT's Refitter and refit it;
        the problems met (empty: done)."""
        refitter = self.refitter(engine)
        held = {name: self.weights(arr) for name, arr in arrays.items()}
        problems = [f"{name!r}: TensorRT's Refitter rejected the value" for name, w in held.items()
                    if not refitter.set_named_weights(name, w)]
        if not problems and not refitter.refit_cuda_engine():
            problems.append("TensorRT's Refitter.refit_cuda_engine() returned False")
        return problems


_LOADED: list[TorchTensorRT] = []


def load() -> TorchTensorRT:
    """Import Torch-TensorRT (inside :func:`cpu_scope`) and its private entry points; raises
    :class:`TorchTensorRTUnavailableError` saying what is missing: the package, a tested version, or
    an entry point by its module and name."""
    if _LOADED:
        return _LOADED[0]
    version = installed_version()
    # Importing Torch-TensorRT puts a proxy of the TensorRT it uses under the name ``tensorrt``
    # (sys.modules): refitcore's own TensorRT (refitcore._trt, which prefers ``tensorrt``) is chosen
    # first, so that it is the same module whether Torch-TensorRT was imported or not.
    _trt.available()
    try:
        with cpu_scope():
            package = importlib.import_module("torch_tensorrt")
    except Exception as err:  # any import failure: the package cannot be used here (said as such)
        raise TorchTensorRTUnavailableError(
            f"torch_tensorrt cannot be imported ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''});"
            f" install the torch-tensorrt extra (pip install 'pytest-trtrefit[torch-tensorrt]')") from err
    if version not in TESTED_VERSIONS:
        raise TorchTensorRTUnavailableError(
            f"Torch-TensorRT {version} is not a tested version ({', '.join(TESTED_VERSIONS)}): the CPU harness uses "
            f"its private entry points ({', '.join(sorted(_ENTRY_POINTS))}); install a tested version")
    entry: dict[str, Any] = {}
    for name, (module_name, attr) in _ENTRY_POINTS.items():
        try:
            module = importlib.import_module(module_name)
            entry[name] = module if attr is None else getattr(module, attr)
        except (ImportError, AttributeError) as err:
            raise TorchTensorRTUnavailableError(
                f"Torch-TensorRT {version} lacks the entry point {module_name}.{attr or ''} that the CPU harness "
                f"uses ({type(err).__name__}: {err}); install a tested version ({', '.join(TESTED_VERSIONS)})") from err
    _LOADED.append(TorchTensorRT(version, package, entry))
    return _LOADED[0]


def available() -> tuple[bool, str]:
    """(True, version) when :func:`load` works here, else (False, the reason)."""
    try:
        return True, load().version
    except TorchTensorRTUnavailableError as err:
        return False, str(err)
