"""Smoke run of the engine bench on a tiny model (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from bench.engine_bench import format_table, main, run_engine_bench


def _tiny_builder():
    """`build_tiny_model` from tests/slimserve/conftest.py, loaded under a private name."""
    path = Path(__file__).resolve().parents[1] / "slimserve" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_slimserve_tiny_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny model; the bench sets torch's (process-wide) thread count, restored afterwards."""
    before = torch.get_num_threads()
    yield _tiny_builder()(tmp_path_factory.mktemp("bench-tiny"))
    torch.set_num_threads(before)


def test_engine_bench_smoke(tiny_dir):
    result = run_engine_bench(tiny_dir, concurrencies=(1, 3), max_tokens=4, repeats=1, threads=1)
    assert [r["concurrency"] for r in result["rows"]] == [1, 3]
    for row in result["rows"]:
        assert row["requests_ok"] == row["concurrency"] and row["requests_failed"] == 0
        assert row["output_tok_s"] > 0 and row["hf_tok_s"] > 0 and row["speedup"] > 0
        assert row["ttft_p50_s"] is not None and row["tpot_p50_s"] is not None
    table = format_table(result)
    assert "out tok/s" in table and "peak memory" in table


def test_engine_bench_main_writes_report(tiny_dir, tmp_path, capsys):
    assert (
        main(tiny_dir, concurrencies=(2,), max_tokens=4, repeats=1, threads=1, report_dir=tmp_path)
        == 0
    )
    report = json.loads((tmp_path / f"engine_bench_{tiny_dir.name}.json").read_text())
    assert report["rows"][0]["concurrency"] == 2
    assert "TTFT p50/p99 ms" in capsys.readouterr().out
