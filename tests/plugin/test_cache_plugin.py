"""Engines persist across ``pytest --trt-refit`` sessions: pytest's cache directory by default,
``--trt-refit-cache-dir``, ``--cache-clear``, ``--trt-refit-no-cache``, ini mirrors, the summary line;
and the architecture fingerprint is one in every pytest-xdist worker."""
from __future__ import annotations

import logging

import pytest

from tests.plugin.test_plugin import PASSING_TEST, _warm_imports, repo  # noqa: F401

pytest_plugins = ["pytester"]

ONE_CHECK = '''
from tinymodels import ConvBn, conv_input


def test_pretrained(trt_refit):
    trt_refit.check(ConvBn, ConvBn().state_dict(), conv_input())
'''


def _run(repo, *args):
    result = repo.runpytest_inprocess("--trt-refit", "--trt-refit-seed=5", *args)
    assert result.ret == 0, result.stdout.str()
    return result


def test_default_persists_in_pytests_cache_and_cache_clear_empties_it(repo):
    repo.makepyfile(test_one=ONE_CHECK)
    _run(repo).stdout.fnmatch_lines(["engine cache: 0 hit(s), 1 miss(es); *trtrefit-engines"])
    engines = repo.path / ".pytest_cache" / "d" / "trtrefit-engines"
    assert len([p for p in engines.iterdir() if p.suffix == ".engine"]) == 1
    _run(repo).stdout.fnmatch_lines(["engine cache: 1 hit(s), 0 miss(es); *trtrefit-engines"])
    _run(repo, "--cache-clear").stdout.fnmatch_lines(["engine cache: 0 hit(s), 1 miss(es); *"])


def test_both_paths_pass_on_a_hit(repo):
    repo.makepyfile(test_props=PASSING_TEST)
    _run(repo, "--trt-refit-paths=both")
    result = _run(repo, "--trt-refit-paths=both")
    result.stdout.fnmatch_lines(["engine cache: 1 hit(s), 0 miss(es); *", "*2 passed*"])
    result.stdout.no_fnmatch_line("*FAILED*")


def test_cache_dir_option_and_cache_clear(repo, tmp_path):
    repo.makepyfile(test_one=ONE_CHECK)
    where = tmp_path / "engines"
    _run(repo, f"--trt-refit-cache-dir={where}").stdout.fnmatch_lines([f"engine cache: 0 hit(s), 1 miss(es); {where}"])
    _run(repo, "-p", "no:cacheprovider", f"--trt-refit-cache-dir={where}").stdout.fnmatch_lines(
        ["engine cache: 1 hit(s), 0 miss(es); *"])
    _run(repo, f"--trt-refit-cache-dir={where}", "--cache-clear").stdout.fnmatch_lines(
        ["engine cache: 0 hit(s), 1 miss(es); *"])


def test_ini_mirror_of_the_cache_dir(repo):
    repo.makepyfile(test_one=ONE_CHECK)
    repo.makeini("[pytest]\ntrt_refit_cache_dir = my-engines\n")
    _run(repo)
    _run(repo).stdout.fnmatch_lines(["engine cache: 1 hit(s), 0 miss(es); *my-engines"])


@pytest.mark.parametrize("args,ini,why", [
    (("-p", "no:cacheprovider"), "", "off (pytest's cacheprovider is disabled; give --trt-refit-cache-dir=DIR*"),
    (("--trt-refit-no-cache",), "", "off (--trt-refit-no-cache)"),
    ((), "[pytest]\ntrt_refit_no_cache = true\n", "off (--trt-refit-no-cache)"),
], ids=["no-cacheprovider", "no-cache-flag", "no-cache-ini"])
def test_no_persistence(repo, args, ini, why):
    repo.makepyfile(test_one=ONE_CHECK)
    if ini:
        repo.makeini(ini)
    _run(repo, *args)
    _run(repo, *args).stdout.fnmatch_lines([f"engine cache: 0 hit(s), 0 miss(es); {why}"])


def test_help_lists_the_cache_options(repo):
    repo.runpytest("--help").stdout.fnmatch_lines(["*--trt-refit-cache-dir=DIR*", "*--trt-refit-no-cache*"])


FINGERPRINT_TEST = '''
import os
import torch
from torch import nn
from pytest_trtrefit.engines import architecture_key


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.tags = frozenset({"alpha", "beta", "gamma"})

    def forward(self, x):
        y = sum(v for v in (x, x))
        return self.attn(y, y, y)[0]


def test_write_fingerprint():
    worker = os.environ.get("PYTEST_XDIST_WORKER", "none")
    with open(f"fp-{worker}.txt", "w") as fh:
        fh.write(architecture_key(Attn()))
'''


def test_fingerprint_is_one_in_every_xdist_worker(pytester):
    pytest.importorskip("xdist")
    pytester.makepyfile(test_fp=FINGERPRINT_TEST)
    result = pytester.runpytest_subprocess("-n", "2", "--dist", "each", "-p", "no:cacheprovider")
    assert result.ret == 0, result.stdout.str()
    prints = sorted(pytester.path.glob("fp-gw*.txt"))
    assert [p.name for p in prints] == ["fp-gw0.txt", "fp-gw1.txt"]
    values = {p.read_text() for p in prints}
    assert len(values) == 1 and len(values.pop()) == 64


def test_a_warm_cached_only_session_never_exports(repo, tmp_path):
    repo.makepyfile(test_one=ONE_CHECK)
    report = tmp_path / "r.json"
    for paths, exported in (("cached", None), ("cached", None), ("both", True)):
        _run(repo, f"--trt-refit-paths={paths}", f"--trt-refit-report={report}")
        import json

        builds = json.loads(report.read_text())["builds"]
        assert len(builds) == 1 and builds[0].get("exported_on_hit") is exported, builds
    assert builds[0]["cache"] == "hit"


def _planted_session(tmp_path, paths):
    """A session whose engine cache holds, under small_net's key, an engine of another graph
    (small_net_gelu: the same parameters, GELU for ReLU)."""
    import torch

    import refitcore
    from pytest_trtrefit.config import RefitConfig
    from pytest_trtrefit.service import RefitSession
    from refitcore.cache.store import EngineCache, pack_entry
    from refitcore.compiler.native import compile_cache_key as cache_key
    from tests.cli_models import small_net, small_net_gelu

    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    key = cache_key(small_net(), (x,), backend="reference")
    wrong = refitcore.compile(small_net_gelu(), x, backend="reference")
    EngineCache(tmp_path).save(key.digest, pack_entry(key, wrong))
    session = RefitSession(RefitConfig(enabled=True, backend="reference", paths=paths))
    session.engines.cache_dir = str(tmp_path)
    return session, small_net, x


def test_a_wrong_cached_engine_is_refused_when_it_is_hit(tmp_path):
    """The plugin verifies an engine-cache hit against eager PyTorch on the test's samples: a planted
    engine of another graph is evicted and rebuilt before any check runs on it."""
    session, factory, x = _planted_session(tmp_path, ("cached",))
    assert session.check(factory, factory().state_dict(), x).ok
    assert session.builds[-1]["cache"] == "miss"


def test_a_wrong_cached_engine_is_rebuilt_when_the_fallback_exports(tmp_path, caplog):
    session, factory, x = _planted_session(tmp_path, ("cached", "fallback"))
    with caplog.at_level(logging.WARNING, logger="refitcore"):
        outcome = session.check(factory, factory().state_dict(), x)
    assert outcome.ok
    # refused by the hit's verification, before the fallback's export would see that its graph differs
    assert session.builds[-1]["cache"] == "miss" and "does not fit this model" in caplog.text


NAMED_OUTPUT_TEST = '''
from typing import NamedTuple

import torch
from torch import nn


class HeadOut(NamedTuple):
    logits: torch.Tensor
    hidden: torch.Tensor


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return HeadOut(h * 2, h)


def test_head(trt_refit):
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    trt_refit.check(Head, Head().state_dict(), x)
    out = trt_refit.engine_for(Head, x)(x)
    assert type(out) is HeadOut, type(out)
'''


def test_an_engine_from_the_cache_returns_the_models_own_output_types_without_a_warning(repo, tmp_path):
    """A cached entry only names its output types; the model is at hand, so a hit takes them from it
    and never tells the plugin's user to pass them to refitcore.load, a call they do not make."""
    repo.makepyfile(test_named=NAMED_OUTPUT_TEST)
    args = ("-rA", f"--trt-refit-cache-dir={tmp_path / 'engines'}")
    _run(repo, *args).stdout.fnmatch_lines(["engine cache: 0 hit(s), 1 miss(es); *"])
    second = _run(repo, *args)
    second.assert_outcomes(passed=1)
    second.stdout.fnmatch_lines(["engine cache: 1 hit(s), 0 miss(es); *"])
    second.stdout.no_fnmatch_line("*pass output_types=*")
    second.stdout.no_fnmatch_line("*plain dicts*")
