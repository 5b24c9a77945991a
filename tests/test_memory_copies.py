"""One copy of the weights: no step of a gate or a refit copies the whole state_dict again.

Each test counts the bytes a step copies, on a small model. Two counters: where a tensor's or an
array's memory lies (inside the checkpoint file's memory mapping, read from /proc/self/maps, or
not: a copy), and ``tracemalloc`` for NumPy's allocations (NumPy reports them to it; torch's CPU
allocator does not, hence the first counter). Sizes: :func:`mlp` holds ~1.2 MB of float32 weights,
so a whole copy is far above the few kB of the constants a step may allocate.
"""
from __future__ import annotations

import json
import os
import re
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import refitcore
import refitcore.refitting.validate
from refitcore.capture.eager import eager_model
from refitcore.dtypes import to_numpy
from refitcore.engine import bundle
from refitcore.engine.refittable import load
from refitcore.refitting.checkpoints import read_file
from refitcore.refitting.driver import apply_mapping
from refitcore.refitting.mapping import cached_mapping
from refitcore.refitting.prepare import prepare_weights

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")

X = torch.randn(2, 256, generator=torch.Generator().manual_seed(0))
FACTORY = "tests.test_memory_copies:mlp"


def mlp() -> torch.nn.Module:
    """Linear layers only: every engine weight is a copy recipe (a view of one state_dict key)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256),
                               torch.nn.ReLU(), torch.nn.Linear(256, 64)).eval()


def state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * 0.05).to(dtype) for k, v in mlp().state_dict().items()}


def weight_bytes(tensors) -> int:
    return sum(t.nbytes for t in tensors)


def mapped_ranges(path) -> list[tuple[int, int]]:
    """The address ranges where ``path`` is memory-mapped in this process."""
    real = os.path.realpath(path)
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and os.path.realpath(parts[5]) == real:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi))
    return out


def copied_bytes(values, path) -> int:
    """Bytes of ``values`` (tensors or arrays) whose memory is not the file's mapping: copies."""
    ranges = mapped_ranges(path)
    total = 0
    for v in values:
        ptr = v.data_ptr() if isinstance(v, torch.Tensor) else v.ctypes.data
        if not any(lo <= ptr and ptr + v.nbytes <= hi for lo, hi in ranges):
            total += v.nbytes
    return total


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("copies")
    engine = refitcore.compile(mlp(), X, backend="reference", model_factory=FACTORY)
    engine.save(d / "m.trtrefit")
    save_file(state(1), str(d / "new.safetensors"))
    save_file(state(1, torch.bfloat16), str(d / "new_bf16.safetensors"))
    return d


def test_the_counter_sees_a_copy(files):
    """The counter itself: a clone of the mapped weights is all copied bytes, the mapping none."""
    mapped = read_file(files / "new.safetensors")
    assert copied_bytes(mapped.values(), files / "new.safetensors") == 0
    clones = [t.clone() for t in mapped.values()]
    assert copied_bytes(clones, files / "new.safetensors") == weight_bytes(clones) > 1_000_000


def test_mapping_a_checkpoint_copies_nothing(files):
    """Reading a safetensors checkpoint maps it: every tensor is a view of the file, in its dtype."""
    for name, dtype in (("new.safetensors", torch.float32), ("new_bf16.safetensors", torch.bfloat16)):
        mapped = read_file(files / name)
        assert all(t.dtype == dtype for t in mapped.values())
        assert copied_bytes(mapped.values(), files / name) == 0, f"{name}: the reader copied the weights"


def test_sharded_checkpoint_maps_every_shard(files, tmp_path):
    """A folder of shards with transformers' index reads as one state_dict, still mapped."""
    whole = read_file(files / "new.safetensors")
    keys = list(whole)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for shard, names in shards.items():
        save_file({k: whole[k].clone() for k in names}, str(tmp_path / shard))
    index = {"metadata": {}, "weight_map": {k: s for s, names in shards.items() for k in names}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    for given in (tmp_path, tmp_path / "model.safetensors.index.json"):
        got = read_file(given)
        assert set(got) == set(keys) and all(torch.equal(got[k], whole[k]) for k in keys)
        assert sum(copied_bytes([got[k] for k in names], tmp_path / s) for s, names in shards.items()) == 0


def test_sharded_index_that_names_a_missing_key_is_refused(files, tmp_path):
    whole = read_file(files / "new.safetensors")
    save_file({k: v.clone() for k, v in whole.items()}, str(tmp_path / "a.safetensors"))
    index = {"weight_map": dict.fromkeys([*whole, "extra.weight"], "a.safetensors")}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(refitcore.WeightMappingError, match="names 1 key"):
        read_file(tmp_path)


def test_bf16_weights_are_not_widened_whole(files):
    """Validation keeps a bfloat16 checkpoint in its dtype (no float32 copy of the state_dict);
    the cached mapping widens each weight as it reads it, to the same values."""
    engine = load(files / "m.trtrefit")
    weights = prepare_weights(engine, str(files / "new_bf16.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in weights.checked.values())
    assert copied_bytes(weights.checked.values(), files / "new_bf16.safetensors") == 0
    mapping = cached_mapping(engine.weight_map, weights)
    widened = cached_mapping(engine.weight_map, {k: v.float() for k, v in weights.state.items()})
    assert all(a.dtype == np.float32 and np.array_equal(a, widened[k]) for k, a in mapping.items())


def test_apply_keeps_views_of_a_checkpoint_the_refit_owns(files):
    """Copy-recipe engine weights alias the mapped file when the refit read it (owned): applying
    allocates no copy of the weights (tracemalloc sees NumPy's copies) and the engine's weights are
    the file's memory. Weights the caller holds are copied, as before."""
    path = files / "new.safetensors"
    engine = load(files / "m.trtrefit")
    weights = prepare_weights(engine, str(path), owned=True)
    mapping = cached_mapping(engine.weight_map, weights)
    total = weight_bytes(mapping.values())
    tracemalloc.start()
    try:
        refitted = apply_mapping(engine, mapping, in_place=True, hand_over=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < total // 10, f"apply copied {peak} bytes of {total}"
    assert copied_bytes(refitted.current_weights().values(), path) < total // 10

    held = {k: v.clone() for k, v in read_file(path).items()}   # the caller's own tensors: copied
    mapping = cached_mapping(engine.weight_map, prepare_weights(engine, held))
    assert not any(a.flags.writeable for a in mapping.values())
    refitted = apply_mapping(engine, mapping, in_place=True, hand_over=True)
    ptrs = {t.data_ptr() for t in held.values()}
    assert not any(a.ctypes.data in ptrs for a in refitted.current_weights().values())


def test_loading_a_bundle_without_its_weights_reads_none(files):
    """The gate loads the bundle weightless (it refits every weight): the file's weights are
    checked but not read; a full load holds one copy of them, not the file and a copy."""
    total = weight_bytes(load(files / "m.trtrefit").current_weights().values())
    tracemalloc.start()
    try:
        engine = load(files / "m.trtrefit", weights=False)
        _, weightless_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        full = load(files / "m.trtrefit")
        _, full_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert engine.weightless and not full.weightless
    assert weightless_peak < total // 4, f"a weightless load read {weightless_peak} bytes of {total}"
    assert full_peak < 1.3 * total, f"a full load peaked at {full_peak} bytes for {total} bytes of weights"


def test_eager_model_shares_weights_handed_over(files):
    """The eager reference model built from a factory allocates no weights of its own (parameters
    on meta, then assigned) and keeps the handed-over tensors as they are; without ``share`` it
    copies them (the caller's tensors are never the model's)."""
    path = files / "new.safetensors"
    mapped = read_file(path)
    model = eager_model(mapped, model=FACTORY, share=True)
    params = list(model.state_dict().values())
    assert copied_bytes(params, path) == 0
    assert torch.equal(model(X), _eager(mapped)(X))
    own = eager_model(mapped, model=FACTORY)
    assert copied_bytes(list(own.state_dict().values()), path) == weight_bytes(params)


def _eager(sd):
    m = mlp()
    m.load_state_dict(sd)
    return m


def spy_on_gate(monkeypatch) -> dict:
    """What the gate's refit saw, filled as it runs: the refitted ``engine`` and the eager ``reference``."""
    import refitcore.gating.gate as gate_module

    seen: dict = {}
    real = gate_module.run_refit

    def spy(engine, weights, **kw):
        report = real(engine, weights, **kw)
        seen.update(engine=report.engine, reference=kw["reference"])
        return report

    monkeypatch.setattr(gate_module, "run_refit", spy)
    return seen


def test_gate_keeps_one_copy_of_the_weights(files, monkeypatch):
    """End to end: the gate's refitted engine and its eager model both hold views of the mapped
    checkpoint: the only copy of the weights is the file's mapping."""
    seen = spy_on_gate(monkeypatch)
    path = files / "new.safetensors"
    report = refitcore.gate(files / "m.trtrefit", path, "random:2", model=FACTORY, paths="cached")
    assert report, str(report)
    total = weight_bytes(read_file(path).values())
    assert copied_bytes(seen["engine"].current_weights().values(), path) < total // 10
    assert copied_bytes(list(seen["reference"].state_dict().values()), path) == 0


def _not_views_of(arrays, model: torch.nn.Module) -> int:
    """Bytes of ``arrays`` that share no memory with any of ``model``'s tensors: copies."""
    own = [to_numpy(t.detach()) for t in model.state_dict().values()]
    return sum(a.nbytes for a in arrays if not any(np.shares_memory(a, o) for o in own))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_with_stripped_weights_keeps_one_copy(dtype, monkeypatch):
    """compile(strip_engine_weights=True) builds the engine on views of the model's tensors (what it
    held just before stripping shares the model's memory), where an ordinary compile copies every
    weight; the stripped engine refitted from the model holds the very weights the ordinary compile
    gives (bit for bit)."""
    from refitcore.engine.refittable import RefittableEngine

    model = mlp().to(dtype)
    total = weight_bytes(model.state_dict().values())
    held: dict = {}
    real = RefittableEngine.strip_weights

    def spy(self):
        held.update(self.impl.current_weights())
        real(self)

    monkeypatch.setattr(RefittableEngine, "strip_weights", spy)
    full = refitcore.compile(model, X.to(dtype), backend="reference")
    stripped = refitcore.compile(model, X.to(dtype), backend="reference", strip_engine_weights=True)
    assert _not_views_of(full.impl.current_weights().values(), model) >= total     # the ordinary engine's copy
    assert held and _not_views_of(held.values(), model) < total // 10            # stripped: the model's own
    assert stripped.weightless and not full.weightless
    assert all(0 in w.strides or w.size <= 1 for w in stripped.impl.current_weights().values())   # placeholders
    with pytest.raises(refitcore.WeightlessEngineError, match="strip_engine_weights=True"):
        stripped(X.to(dtype))
    assert refitcore.refit(stripped, model, path="cached", in_place=True, verify_inputs=[X.to(dtype)])
    assert not stripped.weightless
    want = full.impl.current_weights()
    for k, v in stripped.impl.current_weights().items():
        assert v.dtype == want[k].dtype and np.array_equal(v.reshape(-1), want[k].reshape(-1)), k
    torch.testing.assert_close(stripped(X.to(dtype)), full(X.to(dtype)), rtol=0, atol=0)


def test_a_stripped_engine_saves_without_its_weights_until_refitted(tmp_path):
    model = mlp()
    engine = refitcore.compile(model, X, backend="reference", strip_engine_weights=True)
    engine.save(tmp_path / "s.trtrefit")                    # weightless as it is
    assert (tmp_path / "s.trtrefit").stat().st_size < weight_bytes(model.state_dict().values()) // 10
    with pytest.raises(refitcore.BundleError, match="weightless"):
        engine.save(tmp_path / "w.trtrefit", weights=True)
    assert refitcore.refit(engine, model, path="fallback", in_place=True)
    engine.save(tmp_path / "w.trtrefit")                    # refitted: with its weights
    torch.testing.assert_close(refitcore.load(tmp_path / "w.trtrefit")(X), model(X), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded graph", "re-export"])
def test_gate_fallback_keeps_one_copy_of_the_weights(files, monkeypatch, recorded):
    """The fallback path of the gate converts the bundle's recorded graph with the mapped checkpoint
    (no model rebuilt to export), and the arrays read back off the network are views of it that the
    refitted engine keeps: the fallback's engine is the file's mapping too, as the cached path's. A
    bundle without the record re-exports a model that holds the mapped checkpoint (no copy either)."""
    import refitcore.capture.eager as eager_module

    bundle_path = files / "m.trtrefit"
    if not recorded:
        header, arrays = refitcore.load(bundle_path).to_parts()
        del header["program"]
        bundle_path = files / "m_no_program.trtrefit"
        bundle.write(bundle_path, header, arrays)
    seen = spy_on_gate(monkeypatch)
    built = []
    real_eager = eager_module.eager_model

    def spy_eager(*args, **kw):
        module = real_eager(*args, **kw)
        built.append(module)
        return module

    monkeypatch.setattr("refitcore.engine.reexport.eager_model", spy_eager)
    path = files / "new.safetensors"
    report = refitcore.gate(bundle_path, path, "random:2", model=FACTORY, paths="fallback")
    assert report, str(report)
    total = weight_bytes(read_file(path).values())
    if recorded:
        assert not built, "the fallback exported the model again instead of converting the recorded graph"
    else:
        assert built, "the fallback did not rebuild a model to export"
        assert copied_bytes(list(built[0].state_dict().values()), path) == 0        # the re-exported model
    assert copied_bytes(seen["engine"].current_weights().values(), path) < total // 10


def test_gate_fallback_of_a_bf16_checkpoint_into_a_float32_engine(files):
    """A bfloat16 checkpoint of a float32 model through the fallback: the model re-exported holds the
    keys cast to float32 (an export must see the model's own dtypes; widening per module would show it
    bfloat16), and the refit matches eager within float32's tolerances (widening is exact)."""
    report = refitcore.gate(files / "m.trtrefit", files / "new_bf16.safetensors", "random:2", model=FACTORY,
                            paths="fallback")
    assert report, str(report)


def test_fallback_of_weights_the_caller_holds_copies_them():
    """Weights the caller holds (a state_dict given to refit) are never kept by the engine: the
    fallback's arrays are copies, so the caller's later writes do not reach the refitted engine."""
    engine = refitcore.compile(mlp(), X, backend="reference", model_factory=FACTORY)
    new = state(1)
    result = refitcore.refit(engine, new, path="fallback")
    assert result
    before = result.engine(X).clone()
    for t in new.values():
        t.mul_(2)
    torch.testing.assert_close(result.engine(X), before, rtol=0, atol=0)


def test_a_factory_that_needs_real_parameters_is_built_normally():
    """A module whose construction reads its parameters' values cannot be built on meta: the
    eager model is then built the ordinary way, and still holds the given weights."""
    class Reads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))
            self.register_buffer("scale", self.w.detach().sum().reshape(1), persistent=False)

        def forward(self, x):
            return x * self.w * self.scale

    model = eager_model({"w": torch.full((3,), 2.0)}, model=Reads, share=True)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert torch.equal(model(torch.ones(3)), torch.full((3,), 6.0))


class Said:
    """A progress reporter that records what it is told."""

    def __init__(self):
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)

    def step(self, what: str):
        import contextlib

        return contextlib.nullcontext()


def test_long_steps_say_how_far_they_got():
    """The one progress helper: silent while a step is short, then the count so far."""
    from refitcore.progress import Ticker

    quick, slow = Said(), Said()
    tick_quick, tick_slow = Ticker(quick, "weights mapped", 3), Ticker(slow, "weights mapped", 3, every=0.0)
    for _ in range(3):
        tick_quick()
        tick_slow()
    assert quick.lines == []
    assert slow.lines == ["  weights mapped: 1/3", "  weights mapped: 2/3", "  weights mapped: 3/3"]


def test_conversion_says_how_far_it_got_in_compile_and_in_the_fallback(monkeypatch, files):
    """A long conversion reports graph nodes converted to the reporter of the step it runs in:
    compile(progress=...) and the refit pipeline's fallback step (the gate's stderr)."""
    import refitcore.conversion.convert as convert_module
    from refitcore.progress import Ticker

    class Eager(Ticker):   # every node "takes long"
        def __init__(self, progress, what, total, every=0.0):
            super().__init__(progress, what, total, every=0.0)

    monkeypatch.setattr(convert_module, "Ticker", Eager)
    said = Said()
    refitcore.compile(mlp(), X, backend="reference", progress=said)
    assert said.lines and all(line.startswith("  graph nodes converted: ") for line in said.lines)
    n = int(said.lines[-1].split("/")[-1])
    assert said.lines[-1] == f"  graph nodes converted: {n}/{n}"
    said = Said()
    refitcore.compile(mlp(), X, backend="reference")       # no reporter: nothing said, nothing raised
    assert said.lines == []
    gate_said = Said()
    report = refitcore.gate(files / "m.trtrefit", files / "new.safetensors", "random:2", model=FACTORY,
                            paths="fallback", progress=gate_said)
    assert report and any("graph nodes converted" in line for line in gate_said.lines), gate_said.lines


def test_bf16_weights_handed_over_are_widened_per_module(files):
    """A bfloat16 checkpoint for a float32 model: the eager model keeps the mapped bfloat16 tensors
    (no float32 copy of them all) and computes exactly what the model with the widened weights
    computes; between calls its weights are the file's again."""
    path = files / "new_bf16.safetensors"
    mapped = read_file(path)
    model = eager_model(mapped, model=FACTORY, share=True)
    assert copied_bytes(list(model.state_dict().values()), path) == 0
    expected = _eager({k: v.float() for k, v in mapped.items()})(X)
    with torch.no_grad():
        assert torch.equal(model(X), expected)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert copied_bytes(list(model.state_dict().values()), path) == 0
    widened = eager_model(mapped, model=FACTORY)   # not handed over: the model's own float32 copies
    assert all(p.dtype == torch.float32 for p in widened.parameters()) and torch.equal(widened(X), expected)


def test_torch_save_archives_are_mapped_too(files, tmp_path):
    """A torch.save file (zip format) is read weights-only and memory-mapped: no copy either."""
    torch.save(state(1), tmp_path / "new.pt")
    mapped = read_file(tmp_path / "new.pt")
    assert copied_bytes(mapped.values(), tmp_path / "new.pt") == 0
    assert all(torch.equal(mapped[k], v) for k, v in state(1).items())


class PartlyEager(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.sin(self.a(x)))


def partly_eager() -> torch.nn.Module:
    return PartlyEager().eval()


def test_gate_of_a_partitioned_bundle_loaded_without_its_weights(tmp_path):
    """The gate loads a partitioned bundle weightless too; both paths (the fallback reads the
    PyTorch segments' dtypes off the placeholders) still refit and pass."""
    engine = refitcore.compile(partly_eager(), torch.randn(2, 8), backend="reference", min_block_size=1,
                               torch_executed_ops=["aten.sin.default"])
    assert engine.partition is not None
    engine.save(tmp_path / "m.trtrefit")
    g = torch.Generator().manual_seed(1)
    save_file({k: torch.randn(v.shape, generator=g) for k, v in partly_eager().state_dict().items()},
              str(tmp_path / "new.safetensors"))
    report = refitcore.gate(tmp_path / "m.trtrefit", tmp_path / "new.safetensors", "random:2",
                            model="tests.test_memory_copies:partly_eager")
    assert report and set(report.to_json()["paths"]) == {"cached", "fallback"}, str(report)


def mlp_bf16() -> torch.nn.Module:
    return mlp().to(torch.bfloat16)


@pytest.fixture(scope="module")
def bf16_files(tmp_path_factory):
    """A bfloat16 model compiled into a bfloat16 engine, and a bfloat16 checkpoint of other weights."""
    d = tmp_path_factory.mktemp("copies_bf16")
    engine = refitcore.compile(mlp_bf16(), X.to(torch.bfloat16), backend="reference", precision="bf16",
                               model_factory="tests.test_memory_copies:mlp_bf16")
    engine.save(d / "m.trtrefit")
    save_file(state(1, torch.bfloat16), str(d / "new.safetensors"))
    return d


def test_bf16_checkpoint_into_a_bf16_engine_is_handed_over_as_mapped(bf16_files):
    """Same dtype in and out: a copy-recipe engine weight is the mapped key's bits (no widening and
    rounding back, no new array), owned or not; applying an owned mapping keeps the file's memory."""
    path = bf16_files / "new.safetensors"
    engine = load(bf16_files / "m.trtrefit")
    weights = prepare_weights(engine, str(path), owned=True)
    mapping = cached_mapping(engine.weight_map, weights)
    total = weight_bytes(mapping.values())
    assert total > 500_000 and all(a.dtype == np.uint16 for a in mapping.values())
    assert copied_bytes(mapping.values(), path) == 0, "the cached mapping copied bfloat16 weights"
    for name, src in engine.weight_map.sources.items():   # the bits are the key's
        key = src.inputs["x"]["key"]
        assert np.array_equal(mapping[name].reshape(-1), to_numpy(weights.checked[key]).reshape(-1))
    refitted = apply_mapping(engine, mapping, in_place=True, hand_over=True)
    assert copied_bytes(refitted.current_weights().values(), path) == 0
    held = prepare_weights(engine, {k: v.clone() for k, v in read_file(path).items()})   # the caller's: read-only views
    views = cached_mapping(engine.weight_map, held)
    assert not any(a.flags.writeable for a in views.values())
    ptrs = {t.data_ptr() for t in held.checked.values()}
    assert {a.ctypes.data for a in views.values() if a.size > 1} <= ptrs


def test_bf16_into_bf16_gives_what_widening_and_rounding_gives(bf16_files):
    """The shortcut is exact: the same bits as the float32 checkpoint of the same values rounded once."""
    engine = load(bf16_files / "m.trtrefit")
    narrow = read_file(bf16_files / "new.safetensors")
    mapping = cached_mapping(engine.weight_map, narrow)
    widened = cached_mapping(engine.weight_map, {k: v.float() for k, v in narrow.items()})
    assert set(mapping) == set(widened)
    assert all(np.array_equal(a, widened[k]) for k, a in mapping.items())


def test_bf16_into_bf16_still_refuses_a_weight_that_flushes(bf16_files):
    """Handed over as is, a weight whose values that matter are subnormal is still refused (as the
    widened path refuses it), naming the engine weight."""
    engine = load(bf16_files / "m.trtrefit")
    tiny = state(1, torch.bfloat16)
    tiny["2.weight"] = (torch.randn(tiny["2.weight"].shape) * 1e-39).to(torch.bfloat16)
    with pytest.raises(refitcore.WeightMappingError, match="2/linear.weight.*smallest normal"):
        cached_mapping(engine.weight_map, tiny)


def test_gate_of_a_bf16_engine_keeps_one_copy_of_the_weights(bf16_files, monkeypatch):
    """End to end at bfloat16: the bundle loads weightless (bfloat16 placeholders), and the refitted
    engine and the eager model both hold the mapped checkpoint's memory."""
    assert load(bf16_files / "m.trtrefit", weights=False).weightless
    seen = spy_on_gate(monkeypatch)
    path = bf16_files / "new.safetensors"
    report = refitcore.gate(bf16_files / "m.trtrefit", path, "random:2", model="tests.test_memory_copies:mlp_bf16",
                            paths="cached")
    assert report, str(report)
    assert copied_bytes(seen["engine"].current_weights().values(), path) == 0
    assert copied_bytes(list(seen["reference"].state_dict().values()), path) == 0


def test_running_a_bf16_engine_holds_no_copy_of_its_constants():
    """A constant layer of a reduced-precision engine outputs its weights as they are: no widened
    and rounded-back copy of every weight lives while the network runs (the whole model's worth)."""
    from refitcore.backends.reference_ops import run_layer_rounded

    w = torch.randn(6).to(torch.bfloat16)
    layer = {"name": "c", "type": "CONSTANT", "inputs": [], "attrs": {"shape": [2, 3]}, "weights": {},
             "outputs": [{"name": "c_out", "shape": [2, 3], "dtype": "BF16"}]}
    (out,) = run_layer_rounded(layer, [], {"CONSTANT": w})
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3)
    assert out.data_ptr() == w.data_ptr() and torch.equal(out.reshape(-1), w)


def test_a_partitioned_engine_is_stripped_too_and_submodules_are_refused():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4),
                                torch.nn.BatchNorm1d(4)).eval()
    x = torch.randn(2, 8)
    engine = refitcore.compile(model, x, backend="reference", strip_engine_weights=True,
                               torch_executed_ops=["aten.relu.default"], min_block_size=1)
    assert engine.partition is not None and engine.weightless
    assert refitcore.refit(engine, model, path="cached", in_place=True, verify_inputs=[x])
    torch.testing.assert_close(engine(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="submodules= with strip_engine_weights=True"):
        refitcore.compile(model, x, backend="reference", strip_engine_weights=True, submodules=["0"])


def conv_bn() -> torch.nn.Module:
    """resnet18: convolutions with BatchNorm folded into them (new arrays in the fallback)."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def _bases(arr) -> list[str]:
    """The types along an array's chain of ``.base`` (what keeps its memory alive)."""
    chain = []
    while arr is not None and len(chain) < 8:
        chain.append(type(arr).__name__)
        arr = getattr(arr, "base", None)
    return chain


def test_fallback_of_owned_weights_hands_out_arrays_that_keep_their_memory(tmp_path):
    """Folded weights read back off the fallback's network are the conversion's own arrays, not NumPy
    views of TensorRT's ``Weights``: a Weights object only points at the conversion's array and does
    not keep it alive, so such a view dangles once the network is freed (the resnet50 gate of
    benchmarks/bench_scale.py, whose freed arrays are unmapped at once, crashed with SIGSEGV reading
    one). Every array's memory is held by its own chain of bases, and the refitted engine answers as
    eager does."""
    import gc

    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    factory = "tests.test_memory_copies:conv_bn"
    engine = refitcore.compile(conv_bn(), x, backend="reference", model_factory=factory)
    assert {s.recipe for s in engine.weight_map.sources.values()} >= {"bn_fold_kernel"}
    engine.save(tmp_path / "cb.trtrefit")
    new = conv_bn()
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.01)
    save_file({k: v.contiguous() for k, v in new.state_dict().items()}, str(tmp_path / "cb.safetensors"))
    loaded = load(tmp_path / "cb.trtrefit", weights=False)
    weights = prepare_weights(loaded, str(tmp_path / "cb.safetensors"), owned=True)
    mapping = refitcore.fallback_mapping(loaded, weights, model=factory)
    gc.collect()
    dangling = {k: _bases(a) for k, a in mapping.items() if "Weights" in _bases(a)}
    assert not dangling, dangling
    refitted = apply_mapping(loaded, mapping, hand_over=True)
    torch.testing.assert_close(refitted(x), new(x), rtol=1e-4, atol=1e-4)


def test_stripping_is_the_caller_s_choice_on_an_engine_cache_hit(tmp_path):
    """The engine cache stores engines weightless either way: a hit answers the compile call that
    asked, stripped or not, whatever the call that stored the entry asked."""
    model = mlp()
    stored = refitcore.compile(model, X, backend="reference", cache=tmp_path, strip_engine_weights=True)
    assert stored.cache_hit is False and stored.weightless and stored.options.strip_engine_weights
    hit = refitcore.compile(model, X, backend="reference", cache=tmp_path)
    assert hit.cache_hit is True and not hit.weightless and not hit.options.strip_engine_weights
    torch.testing.assert_close(hit(X), model(X), rtol=1e-5, atol=1e-5)
    again = refitcore.compile(model, X, backend="reference", cache=tmp_path, strip_engine_weights=True)
    assert again.cache_hit is True and again.weightless and again.options.strip_engine_weights


def test_finite_views_are_the_arrays_inside_checked_keys():
    """Only contiguous arrays wholly inside a checked key's memory, read as its own element type at an
    element boundary, are spared the driver's second finiteness pass."""
    a = torch.randn(4, 8)
    b = torch.randn(16).to(torch.bfloat16)
    unchecked = torch.randn(8)
    checked = {"a": a, "b": b, "u": unchecked}
    bits = to_numpy(b)
    assert bits.dtype == np.uint16 and bits.ctypes.data == b.data_ptr()
    mapping = {
        "rows": a.numpy()[1:3],                                  # a view: same values
        "bf16": bits[4:12],                                      # bit patterns of b: same values
        "copy": a.numpy().copy(),                                # new memory
        "transposed": a.numpy().T,                               # not contiguous
        "reinterpreted": a.numpy().reshape(-1).view(np.float16)[:8],   # another element type
        "misaligned": a.numpy().reshape(-1).view(np.uint8)[2:34].view(np.float32),   # not at an element boundary
        "past_the_end": np.lib.stride_tricks.as_strided(a.numpy()[3], shape=(16,), strides=(4,)),
        "of_an_unchecked_key": unchecked.numpy(),
    }
    assert refitcore.refitting.validate.finite_views(mapping, checked, ["a", "b"]) == {"rows", "bf16"}
    assert refitcore.refitting.validate.finite_views(mapping, checked, ["a", "b", "u"]) == {
        "rows", "bf16", "of_an_unchecked_key"}


def test_the_driver_still_reads_every_array_that_is_not_a_view_of_a_checked_key(files):
    """The fallback of an owned checkpoint: its copy-recipe arrays are views of the mapped keys (not
    read again), and a NaN in any other array is still refused, naming the weight."""
    engine = load(files / "m.trtrefit")
    weights = prepare_weights(engine, read_file(files / "new.safetensors"), owned=True)
    mapping = refitcore.fallback_mapping(engine, weights)
    views = refitcore.refitting.validate.finite_views(mapping, weights.checked, weights.weight_map.keys_used)
    assert views == set(mapping), "the fallback's copy-recipe weights should be views of the checkpoint"
    name = sorted(mapping)[0]
    poisoned = dict(mapping, **{name: np.full_like(mapping[name], np.nan)})
    with pytest.raises(refitcore.WeightMappingError, match=re.escape(repr(name)) + ".*non-finite"):
        apply_mapping(engine, poisoned, checked_finite=refitcore.refitting.validate.finite_views(
            poisoned, weights.checked, weights.weight_map.keys_used))
