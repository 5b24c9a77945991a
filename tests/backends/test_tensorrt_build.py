"""Building a refittable plan (refitcore/backends/tensorrt_build.py): builder flags on the real
TensorRT Python API, where importable (network-level only: no GPU)."""
from __future__ import annotations

import pytest


def test_builder_config_sets_refit_and_clears_tf32_by_default(real_trt):
    t = real_trt
    from refitcore import _trt
    from refitcore.backends.tensorrt_build import builder_config

    builder = t.Builder(_trt.logger())
    cfg = builder_config(builder)
    assert cfg.get_flag(t.BuilderFlag.REFIT)
    assert not cfg.get_flag(t.BuilderFlag.TF32)
    assert builder_config(builder, tf32=True).get_flag(t.BuilderFlag.TF32)
    assert not builder_config(builder, refit=False).get_flag(t.BuilderFlag.REFIT)
    with pytest.raises(ValueError, match="precision"):
        builder_config(builder, precision="int8")


def test_reduced_precision_sets_no_builder_flag_the_network_is_strongly_typed(real_trt):
    """fp16/bf16 live in the strongly typed network's types (a strongly typed network takes no
    precision flag; TensorRT-RTX has none): the config is fp32's, and the network says fp16."""
    t = real_trt
    import torch

    from refitcore import _trt
    from refitcore.backends.tensorrt_build import builder_config
    from refitcore.conversion.convert import convert

    builder = t.Builder(_trt.logger())
    for precision in ("fp16", "bf16"):
        cfg = builder_config(builder, precision=precision)
        assert cfg.get_flag(t.BuilderFlag.REFIT)
        if hasattr(t.BuilderFlag, "FP16"):
            assert not cfg.get_flag(t.BuilderFlag.FP16)
    ep = torch.export.export(torch.nn.Linear(4, 2).eval(), (torch.randn(1, 4),))
    network = convert(ep, precision="fp16").network
    assert network.get_flag(t.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert network.get_input(0).dtype == t.DataType.FLOAT          # the model's type at the boundary
    assert {network.get_layer(i).get_output(0).dtype for i in range(network.num_layers)} >= {t.DataType.HALF}
