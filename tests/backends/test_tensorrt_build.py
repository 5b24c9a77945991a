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


def test_fp16_is_refused_with_reason_where_the_api_has_no_fp16_flag(real_trt):
    t = real_trt
    from refitcore import _trt
    from refitcore.backends.tensorrt_build import builder_config
    from refitcore.errors import BackendUnavailableError

    builder = t.Builder(_trt.logger())
    if hasattr(t.BuilderFlag, "FP16"):
        assert builder_config(builder, precision="fp16").get_flag(t.BuilderFlag.FP16)
    else:
        with pytest.raises(BackendUnavailableError, match="FP16"):
            builder_config(builder, precision="fp16")
