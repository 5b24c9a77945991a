"""Dynamic shapes in the plugin, black-box through ``pytester``: the declarative hook and the
fixture take ``dynamic_shapes=``, the default property test checks the whole range (min, opt, max,
drawn shapes), and so catches a converter that bakes the example's batch size into the network."""
from __future__ import annotations

import pytest

from tests.plugin.conftest import model_repo

pytest_plugins = ["pytester"]

MODELS_SRC = '''
import torch
from torch import nn


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.view(y.size(0), -1))


def example():
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
'''

DECLARED = '''
from tinydyn import Head, example


def pytest_trt_refit_models():
    return {"head": (Head, example(), {"examples": 3, "checks": ["weights"], "dynamic_shapes": {"x": {0: (1, 8)}}})}
'''

# The planted bug: the dynamic reshape replaced by one that bakes in the exported example's sizes
# (batch 2), as a careless converter would. Right at the example's shape, wrong everywhere else.
PLANTED = '''
import torch

import refitcore.conversion.converters.shape as shape_converters
from refitcore.conversion.converters._util import reshape

_original = shape_converters.reshape_to_meta


def _baked(ctx, x, suffix=None):
    sizes = [s.node.hint if isinstance(s, torch.SymInt) else int(s) for s in ctx.node.meta["val"].shape]
    return reshape(ctx, x, sizes, suffix)


def pytest_configure(config):
    shape_converters.reshape_to_meta = _baked


def pytest_unconfigure(config):
    shape_converters.reshape_to_meta = _original
'''


@pytest.fixture(scope="module")
def _warm_imports():
    """Import (and run once) what the in-process runs use: pytester restores ``sys.modules`` after
    each run, and the converter registry must not be imported twice."""
    import hypothesis.extra  # noqa: F401
    import torch

    import refitcore
    import refitcore.conversion.converters.shape
    from pytest_trtrefit import checks, declarative, report, service, strategies  # noqa: F401

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    refitcore.compile(model, torch.randn(2, 2, 2), backend="reference", dynamic_shapes={0: {0: (1, 4)}})


@pytest.fixture
def repo(_warm_imports, pytester):
    return model_repo(pytester, "tinydyn", MODELS_SRC)




def test_declared_dynamic_model_passes_across_its_range(repo):
    repo.makeconftest(DECLARED)
    result = repo.runpytest_inprocess("--trt-refit", "--trt-refit-seed=3", "--trt-refit-report=r.json")
    result.assert_outcomes(passed=1)
    import json

    report = json.loads((repo.path / "r.json").read_text())
    builds = report.get("builds") or []
    assert any(b.get("profiles") == [[[[1, 2, 8], [3, 3, 3], [6, 6, 6], [6, 6, 6]]]] for b in builds), builds


DECLARED_DEFAULTS = '''
from tinydyn import Head, example


def pytest_trt_refit_models():
    return {"head": (Head, example(), {"dynamic_shapes": {"x": {0: (1, 8)}}})}
'''


def test_a_converter_that_bakes_the_batch_size_is_caught(repo):
    """The default property tests (every check kind, default settings) catch it; the example
    shape alone would not."""
    repo.makeconftest(DECLARED_DEFAULTS + PLANTED)
    repo.makepyfile(test_example_only='''
        from tinydyn import Head, example

        def test_at_the_example_shape_only(trt_refit):   # the same engine, checked at opt alone: passes
            trt_refit.check(Head, Head().state_dict(), example(), dynamic_shapes={"x": {0: (1, 8)}})
    ''')
    result = repo.runpytest_inprocess("--trt-refit", "--trt-refit-seed=3", "-p", "no:logging")
    result.assert_outcomes(failed=3, passed=1)
    result.stdout.fnmatch_lines([
        "trt-refit check FAILED for model 'head'",
        "*the refitted engine fails on inputs of shape [[][[]1, 3, 6, 6[]][]]: RuntimeError: shape '[[]2, 144[]]' is "
        "invalid for input of size 144*",
    ])


def test_the_fixture_checks_samples_of_several_shapes_on_one_engine(repo):
    repo.makepyfile(test_fixture='''
        import torch
        from tinydyn import Head, example

        def test_range(trt_refit):
            samples = [example()] + [torch.randn(b, 3, 6, 6) for b in (1, 8, 5)]
            trt_refit.check(Head, Head().state_dict(), samples, dynamic_shapes={"x": {0: (1, 8)}})
            engine = trt_refit.engine_for(Head, samples, dynamic_shapes={"x": {0: (1, 8)}})
            assert engine.io.profiles.ranges[0][0] == (1, 2, 8)

        def test_static_engine_refuses_other_shapes(trt_refit):
            import pytest
            with pytest.raises(AssertionError, match="expected shape"):
                trt_refit.check(Head, Head().state_dict(), [example(), torch.randn(4, 3, 6, 6)], paths="cached")
    ''')
    result = repo.runpytest_inprocess("--trt-refit", "-p", "no:logging")
    result.assert_outcomes(passed=2)
