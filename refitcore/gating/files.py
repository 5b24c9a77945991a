"""Files the user names (engine bundles, checkpoints): opened with errors that say what to fix.

:class:`InputError` carries the exit status of the ``trtrefit`` commands: 2 for an unusable input
(missing or damaged file, other architecture), 1 for weights refused or found different.
:func:`compare_files` is ``trtrefit audit``: two bundles' weights, or a checkpoint mapped through a
bundle's weight map against the weights that bundle holds.
"""
from __future__ import annotations

import os
from typing import Any

from refitcore.errors import ArchitectureMismatchError, BundleError, RefitCoreError, WeightMappingError
from refitcore.options import TOOL
from refitcore.refitting.render import Silent

__all__ = ["InputError", "Silent", "require_file", "open_bundle", "read_checkpoint", "open_checkpoint", "is_bundle",
           "compare_files", "EXIT_OK", "EXIT_MISMATCH", "EXIT_UNUSABLE"]

EXIT_OK, EXIT_MISMATCH, EXIT_UNUSABLE = 0, 1, 2


class InputError(RefitCoreError):
    """A problem the user must fix (missing or damaged file, other architecture, no trusted model),
    or refused weights; ``code`` is the exit status: 2 (unusable input) or 1 (refused weights)."""

    def __init__(self, message: str, code: int = EXIT_UNUSABLE):
        super().__init__(message)
        self.code = code


def require_file(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise InputError(f"{what} {path!r}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{what} {path!r} is a directory, not a file")
    return path


def open_bundle(bundle: Any, progress=None, *, weights: bool = True):
    """The engine of a bundle file (a RefittableEngine is returned as is); :class:`InputError` (2)
    says what is wrong with the file. ``weights=False``: the file's weights are checked but not
    read (a weightless engine, for a caller that refits every weight)."""
    progress = progress or Silent()
    if not isinstance(bundle, (str, os.PathLike)):
        return bundle
    from refitcore.engine.refittable import load

    path = require_file(os.fspath(bundle), "engine bundle")
    with progress.step(f"loading engine bundle {path}"):
        try:
            return load(path, weights=weights)
        except BundleError as err:
            raise InputError(f"unusable engine bundle: {err}\n(save the engine again, or recompile it with "
                        f"`{TOOL} compile`)") from err
        except (RefitCoreError, OSError, ValueError) as err:
            raise InputError(f"cannot load engine bundle {path!r}: {err}") from err


def read_checkpoint(checkpoint: Any, progress=None, engine=None, notes: list | None = None):
    """A :class:`~refitcore.refitting.checkpoints.LoadedCheckpoint` from a checkpoint file
    (weights-only; safetensors memory-mapped, a sharded one given by its folder or index) or from
    weights given in memory, fitted to ``engine``'s model when given (what
    was unwrapped, stripped or ignored is said through ``progress`` and appended to ``notes``);
    :class:`InputError` (2) says what is wrong with the file."""
    from refitcore.refitting.checkpoints import load_weights

    progress = progress or Silent()
    fit = {} if engine is None else {"weight_map": engine.weight_map, "state_keys": engine.state_keys}
    if not isinstance(checkpoint, (str, os.PathLike)):
        loaded = load_weights(checkpoint, **fit)
    else:
        path = os.fspath(checkpoint)
        if not os.path.exists(path):   # a folder is a sharded checkpoint: the reader says what it needs
            raise InputError(f"checkpoint {path!r}: no such file")
        with progress.step(f"loading checkpoint {path}"):
            try:
                loaded = load_weights(path, **fit)
            except WeightMappingError as err:
                raise InputError(f"unusable checkpoint: {err}") from err
    for note in loaded.notes:
        progress.info(f"note: {note}")
    if notes is not None:
        notes += loaded.notes
    return loaded


def open_checkpoint(checkpoint: Any, progress=None, engine=None, notes: list | None = None) -> dict:
    """The state_dict of :func:`read_checkpoint`."""
    return read_checkpoint(checkpoint, progress, engine, notes).state_dict


def is_bundle(path: str) -> bool:
    from refitcore.engine.bundle import MAGIC

    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def compare_files(a: str, b: str, *, rtol: float = 1e-5, atol: float = 1e-7, progress=None):
    """(Audit, notes) for two bundles, or a bundle and a checkpoint (either order): does the
    engine hold these weights? :class:`InputError` when neither is a bundle or they cannot match."""
    from refitcore.refitting.audit import audit
    from refitcore.refitting.mapping import cached_mapping

    progress = progress or Silent()
    for p in (a, b):
        require_file(p, "input")
    kinds = [is_bundle(p) for p in (a, b)]
    if not any(kinds):
        raise InputError(f"neither {a!r} nor {b!r} is an engine bundle; give at least one .trtrefit file "
                         f"(compare two checkpoints with torch directly)")
    notes = []
    if all(kinds):
        ea, eb = open_bundle(a, progress), open_bundle(b, progress)
        if ea.fingerprint != eb.fingerprint:
            notes.append("the two bundles were compiled from different graphs")
        with progress.step("comparing the weights the two bundles hold"):
            return audit(ea.current_weights(), eb.current_weights(), rtol=rtol, atol=atol, a_label=a,
                         b_label=b), notes
    bundle_path, ckpt_path = (a, b) if kinds[0] else (b, a)
    engine = open_bundle(bundle_path, progress)
    loaded = read_checkpoint(ckpt_path, progress, engine)
    try:
        with progress.step("mapping the checkpoint through the bundle's weight map (cached path)"):
            mapped = cached_mapping(engine.weight_map, loaded)
    except ArchitectureMismatchError as err:
        raise InputError(f"checkpoint {ckpt_path!r} is for another architecture than {bundle_path!r}: {err}") from err
    except WeightMappingError as err:
        raise InputError(f"checkpoint {ckpt_path!r} cannot be mapped onto {bundle_path!r}: {err}",
                         EXIT_MISMATCH) from err
    return audit(mapped, engine.current_weights(), rtol=rtol, atol=atol, a_label=f"{ckpt_path} (mapped)",
                 b_label=bundle_path), notes
