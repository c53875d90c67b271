"""`make reliability`'s driver without Serve: its options, the phase order, the variant it
picks by default, and the overload phase's figures from a tally (the newer phases:
test_cut_flood_restart.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from reliability import overload, run
from reliability.load import Outcome, Tally


@pytest.mark.timeout(10)
def test_overload_runs_last_on_the_runs_serve_and_restart_after_it():
    served = [p for p in run.PHASES if p in run.SERVED_PHASES]
    assert served[-1] == "overload"  # it redeploys the variant with a short queue
    assert run.PHASES[-1] == "restart"  # Serve's fixed ports: after the run's Serve is gone
    assert list(run.SERVED_PHASES) == list(run.PHASES[1:-1])


@pytest.mark.timeout(10)
def test_quick_shortens_the_new_phases_and_restart_can_be_left_out():
    full, quick = run._args([]), run._args(["--quick"])
    assert (full.flood_connections, full.flood_senders, full.flood_mib) == (200, 20, 32.0)
    assert quick.flood_connections < full.flood_connections and quick.flood_senders > 0
    assert quick.flood_mib == 32.0 and quick.flood_s < full.flood_s
    assert quick.cut_s < full.cut_s
    assert "restart" in full.phases
    assert "restart" not in run._args(["--skip-restart"]).phases


@pytest.mark.timeout(10)
def test_quick_options_and_the_overload_rate_left_to_the_measurement():
    a = run._args(["--quick", "--phases", "faults,overload"])
    assert a.phases == ["faults", "overload"] and a.overload_rate is None
    assert a.overload_factor == run.OVERLOAD_FACTOR > 1
    assert a.variant is None  # filled from the profile by main
    with pytest.raises(SystemExit):
        run._args(["--phases", "faults,nap"])


@pytest.mark.timeout(10)
def test_the_default_variant_is_the_profiles(monkeypatch):
    import slimserve.catalogue as catalogue

    profile = SimpleNamespace(variants={"teacher": 0, "student": 0}, teacher="teacher")
    monkeypatch.setattr(catalogue, "load_profile", lambda _path: profile)
    assert run.default_variant("x.yaml") == "student"
    profile.variants = {"teacher": 0}
    assert run.default_variant("x.yaml") == "teacher"
    profile.default_variant = "student-onnx"  # the catalogue's own field, once it has one
    assert run.default_variant("x.yaml") == "student-onnx"


@pytest.mark.timeout(10)
def test_the_overload_row_counts_503s_and_their_retry_after(monkeypatch):
    outcomes = [
        Outcome("plain", 0.0, 0.020, "failed", 503, "1"),
        Outcome("plain", 0.1, 0.040, "failed", 503, None),
        Outcome("plain", 0.1, 0.030, "failed", 503, "1"),
        Outcome("plain", 0.2, 0.900, "ok", 200),
        Outcome("plain", 0.3, 1.000, "lost"),
    ]
    probes = {"healthz": [0.005, 0.007], "unknown_model": [0.010]}

    async def fake(base, body, rate, seconds):
        return Tally(outcomes), probes

    monkeypatch.setattr(overload, "_overload", fake)
    row = overload.overload_run("http://x", {}, 60.0, 10.0)
    assert row["sent"] == 5 and row["rejected_503"] == 3 and row["with_retry_after"] == 2
    assert row["p50_503_ms"] == 30.0 and row["p99_503_ms"] == 40.0
    assert row["accepted_ok"] == 1 and row["lost"] == 1
    assert row["healthz_p99_ms"] == 7.0 and row["unknown_model_404_p50_ms"] == 10.0
