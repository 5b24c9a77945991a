"""The shared report schema (``trtrefit.report/1``): one top level for the plugin and the gate."""
from __future__ import annotations

import json

import pytest

from refitcore.refitting.report_schema import SCHEMA, ReportSchemaError, check_entry, envelope, path_summaries, validate


def _checks():
    return [check_entry(model="m", path="cached", ok=True, max_abs=1e-7, max_rel=2e-7),
            check_entry(model="m", path="cached", ok=False, max_abs=0.5, max_rel=3.0, culprit="w1", test="t"),
            check_entry(model="m", path="fallback", ok=True, max_abs=0.0, max_rel=float("inf"))]


def test_an_envelope_is_valid_json_with_path_summaries():
    report = envelope(producer="x", status="fail", summary="1 failed", checks=_checks(), backend="reference",
                      backend_note="cpu", rtol=1e-4, atol=1e-4, problems=["t: cached"], extra_key=1)
    validate(report)
    assert report["schema"] == SCHEMA and report["ok"] is False and report["extra_key"] == 1
    assert report["paths"]["cached"] == {"ok": False, "checks": 2, "failed": 1, "max_abs": 0.5, "max_rel": 3.0,
                                         "culprit": "w1"}
    assert report["paths"]["fallback"]["max_rel"] == float("inf")    # a non-finite worst stays the worst
    json.dumps(report)


def test_richer_path_entries_keep_the_shared_keys():
    report = envelope(producer="gate", status="pass", summary="ok", checks=_checks()[:1], backend=None,
                      backend_note=None, rtol=0, atol=0, paths={"cached": {"ok": True, "note": "n"}})
    assert report["paths"]["cached"]["checks"] == 1 and report["paths"]["cached"]["note"] == "n"


@pytest.mark.parametrize("change,message", [
    ({"schema": "other/1"}, "schema is 'other/1'"),
    ({"status": "maybe"}, "status 'maybe' is not one of"),
    ({"ok": True}, "ok=True contradicts status='fail'"),
    ({"checks": [{"model": "m", "path": "p"}]}, "checks[0] lacks ['ok'"),
    ({"paths": {"cached": {"ok": True}}}, "paths['cached'] lacks ['checks'"),
], ids=["schema", "status", "ok-vs-status", "check-fields", "path-fields"])
def test_validate_names_every_departure(change, message):
    report = envelope(producer="x", status="fail", summary="s", checks=_checks(), backend=None, backend_note=None,
                      rtol=0, atol=0)
    with pytest.raises(ReportSchemaError) as err:
        validate({**report, **change})
    assert message in str(err.value)
    broken = dict(report)
    del broken["summary"]
    with pytest.raises(ReportSchemaError, match="missing key 'summary'"):
        validate(broken)


def test_a_bad_status_is_refused_when_building():
    with pytest.raises(ValueError, match="status 'ok'"):
        envelope(producer="x", status="ok", summary="s", checks=[], backend=None, backend_note=None, rtol=0, atol=0)
    assert path_summaries([]) == {}
