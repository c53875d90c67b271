"""Smoke runs of `make bench`'s parts on tiny in-code models (seconds each; no timed assertions).

What is checked is the plumbing and the arithmetic: every bench runs end to end, its rows
have the documented columns, its report is valid for the dashboard, and the coalescing of
streamed tokens keeps the text intact. How fast anything is never decides a test.
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from bench import gpu_decode
from bench.race import serving_report, side_by_side, targets
from bench.serving import CpuMeter, LevelResult, RequestResult, run_levels
from slimserve.artifacts import ArtifactStore, Manifest, folder_bytes, write_manifest
from slimserve.catalogue import load_profile
from slimserve.reports import read_report, write_report

ROOT = Path(__file__).resolve().parents[2]
PROFILE = {
    "name": "benchtest",
    "seed": 0,
    "block_size": 64,
    "tokenizer": {"kind": "bpe", "vocab_size": 300},
    "teacher": "teacher",
    "variants": {
        "teacher": {
            "step": "finetune",
            "params": {"model": {"n_layer": 2, "n_head": 2, "n_embd": 32}, "tokens": 1000},
        },
        "student": {"step": "distill", "from": "teacher", "params": {"layers": [0]}},
    },
}


def _tiny_builder():
    """`build_tiny_model` from tests/slimserve/conftest.py, loaded under a private name."""
    path = ROOT / "tests" / "slimserve" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_slimserve_tiny_fixtures_b", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_tiny_model


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, Path]:
    """A profile file and a store holding only the student (the teacher is not built)."""
    before = torch.get_num_threads()
    base = tmp_path_factory.mktemp("benchstore")
    profile_path = base / "benchtest.yaml"
    profile_path.write_text(yaml.safe_dump(PROFILE, sort_keys=False))
    profile = load_profile(profile_path)
    store = ArtifactStore(base / "artifacts", profile.name)
    with store.writer("student") as tmp:
        _tiny_builder()(tmp)
        n = 12_345
        write_manifest(
            tmp,
            Manifest(
                variant="student",
                profile=profile.name,
                step="distill",
                parent="teacher",
                runtime="torch",
                config_hash=profile.config_hash("student"),
                parent_hash=None,
                params_total=n,
                params_nonzero=n,
                bytes=folder_bytes(tmp),
                metrics={"perplexity": 123.4, "agreement": 0.5},
            ),
        )
    yield profile_path, base / "artifacts"
    torch.set_num_threads(before)


# -- engine (through the CLI) ------------------------------------------------------------------


def test_bench_engine_cli_writes_to_report_dir(store, tmp_path, monkeypatch):
    from slimserve.cli import main as cli_main

    profile_path, root = store
    monkeypatch.chdir(tmp_path)  # a report written to the default reports/ would land here
    argv = ["bench", "engine", "--config", str(profile_path), "--artifacts", str(root)]
    out = tmp_path / "elsewhere"
    rc = cli_main(
        [
            *argv,
            "--concurrency",
            "2",
            "--max-tokens",
            "2",
            "--repeats",
            "1",
            "--report-dir",
            str(out),
        ]
    )
    assert rc == 0
    assert (out / "engine_bench_student.json").is_file()
    assert not (tmp_path / "reports").exists()


# -- variants ---------------------------------------------------------------------------------


def test_variants_bench_smoke(store, tmp_path):
    from bench.variants import COLUMNS, run_variants, variants_report

    profile_path, root = store
    profile = load_profile(profile_path)
    kwargs = {"threads": 1, "repeats": 1, "prompt_tokens": 6, "decode_steps": 2}
    rows = run_variants(profile, ArtifactStore(root, profile.name), isolate=True, **kwargs)
    assert [r["variant"] for r in rows] == ["teacher", "student"]
    assert rows[0]["note"] == "not built"
    student = rows[1]
    assert student["note"] is None and student["perplexity"] == 123.4
    for key in ("prefill_b1_ms", "prefill_b8_ms", "decode_b1_ms", "decode_b8_ms", "tok_s_b8"):
        assert student[key] > 0
    assert student["peak_rss_mb"] > 0 and student["threads"] == 1
    report = variants_report(rows, repeats=1, command="test")
    assert report.tables[0].columns == list(COLUMNS)
    paths = write_report(report, tmp_path, png=False)
    assert read_report(paths[0]).report is not None


# -- the load generator against the baseline ---------------------------------------------------


def test_baseline_and_load_generator_smoke(store):
    from bench.baseline import start_baseline

    _, root = store
    with start_baseline(root / "benchtest" / "student", threads=1) as server:
        meter = CpuMeter({"baseline": server.pid})
        levels = run_levels(
            {"baseline": server.url},
            model="student",
            concurrencies=(1, 2),
            streams=(False, True),
            requests_per_client=1,
            min_requests=2,
            max_tokens=4,
            meter=meter,
            own={"baseline": frozenset({"baseline"})},
        )["baseline"]
        memory = meter.memory()  # the server is still up
    base = memory["baseline"]
    assert base["processes"] == 1 and 20 < base["rss_mib"] <= base["peak_rss_mib"]
    assert memory["client"]["rss_mib"] > 20
    assert [(lv.stream, lv.concurrency) for lv in levels] == [
        (False, 1),
        (True, 1),
        (False, 2),
        (True, 2),
    ]
    for lv in levels:
        row = lv.row()
        assert row["ok"] == 2 and row["failed"] == 0, row["errors"]
        assert 1 <= row["tokens_per_req"] <= 4
        assert (row["ttft_p99_ms"] is not None) == lv.stream
        assert any(r["role"] == "baseline" for r in lv.cpu_rows())
        assert row["cpu_ms_per_token"] is not None


# -- slimserve under Serve (serve_config.yaml as `serve run` applies it) -----------------------


@pytest.mark.slow
def test_serving_bench_smoke(store, tmp_path):
    from bench.run_all import start_serve

    profile_path, root = store
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["applications"][0]["args"]["defaults"]["num_cpus"] = 0.1
    config["applications"][0]["args"]["variants"] = {"student": {"max_batch_size": 4}}
    serve_config = tmp_path / "serve_config.yaml"
    serve_config.write_text(yaml.safe_dump(config))
    meter = CpuMeter()
    with start_serve(serve_config, config=profile_path, artifacts_dir=root) as url:
        levels = run_levels(
            {"slimserve": url},
            model="student",
            concurrencies=(2,),
            requests_per_client=1,
            min_requests=2,
            max_tokens=4,
            meter=meter,
        )["slimserve"]
        memory = meter.memory()
    assert memory["student"]["processes"] == 1 and memory["student"]["rss_mib"] > 50
    for lv in levels:
        row = lv.row()
        assert row["ok"] == 2 and row["failed"] == 0, row["errors"]
        assert row["tokens_per_req"] == 4
        if not lv.stream:
            assert row["hop_ms_p50"] is not None  # the server's own timings came back
        roles = {r["role"] for r in lv.cpu_rows()}
        assert {"student", "Ingress", "proxy"} <= roles


# -- the race report ---------------------------------------------------------------------------


def _level(stream: bool, conc: int, tokens: int, wall: float, ttft: float | None) -> LevelResult:
    results = [RequestResult(True, 0.5, tokens, ttft, frames=tokens) for _ in range(conc)]
    return LevelResult(conc, stream, wall, results, {"proxy": 0.1})


def test_race_report_ratios_and_targets(tmp_path):
    slim = [_level(s, c, 64, 1.0, 0.05 if s else None) for s in (False, True) for c in (1, 16)]
    base = [_level(s, c, 64, 8.0, 0.10 if s else None) for s in (False, True) for c in (1, 16)]
    pairs = side_by_side([lv.row() for lv in slim], [lv.row() for lv in base])
    c16 = next(p for p in pairs if p["concurrency"] == 16)
    assert c16["tok_s_ratio"] == 8.0 and c16["ttft_p99_ratio"] == 0.5
    goals = {g["target"]: g for g in targets(pairs)}
    assert all(g["met"] for g in goals.values())
    slow = [{**p, "tok_s_ratio": 4.0} for p in pairs]
    missed = next(g for g in targets(slow) if g["target"].startswith("16 clients: non-streamed"))
    assert missed["met"] is False and missed["miss"] == "67% of the target; 1.50x more needed"
    report = serving_report(slim, base, 64, command="test")
    assert len(report.tables) == 5 and report.charts
    loaded = read_report(write_report(report, tmp_path, png=False)[0])
    assert loaded.report is not None, loaded.problem


def test_median_level_keeps_the_middle_run_whole():
    from bench.serving import median_level

    runs = [_level(False, 4, tok, 1.0, None) for tok in (30, 10, 20, 40)]
    kept = median_level(runs)
    assert kept is runs[2] and kept.row()["rounds_tok_s"] == [120, 40, 80, 160]
    failed = _level(False, 4, 50, 1.0, None)
    failed.results[0] = RequestResult(False, 0.5, error="HTTP 503")
    kept = median_level([failed, runs[1], runs[0]])
    assert kept is runs[1] and kept.row()["rounds_failed"] == [1, 0, 0]  # failed ranks lowest
    single = _level(True, 1, 8, 1.0, 0.1)
    assert median_level([single]) is single and "rounds_tok_s" not in single.row()
    with pytest.raises(ValueError):
        median_level([])


# -- GPU decode --------------------------------------------------------------------------------


def test_static_decoder_matches_hf_on_cpu():
    """The CUDA-graph path's arithmetic, run eagerly on CPU, against HF GPT-2's logits."""
    model = gpu_decode.gpt2_model(
        "cpu", torch.float32, n_layer=2, n_head=2, n_embd=32, vocab_size=300, n_positions=64
    )
    ids = torch.randint(0, 300, (3, 5), generator=torch.Generator().manual_seed(0))
    dec = gpu_decode.StaticDecoder(model, batch=3, max_len=16)
    logits, seq = dec.prefill(ids), ids
    for _ in range(6):
        tok = logits.argmax(-1)
        seq = torch.cat([seq, tok[:, None]], dim=1)
        logits = dec.decode(tok).clone()
        with torch.inference_mode():
            ref = model(seq).logits[:, -1]
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="CUDA"):
        dec.capture()


def test_gpu_decode_skips_or_runs(tmp_path):
    if torch.cuda.is_available():
        result = gpu_decode.run_gpu_decode(batches=(1,), steps=4, repeats=1)
        assert result["rows"][0]["graph_ms"] > 0
    else:
        result = gpu_decode.run_gpu_decode()
        assert result["skipped"].startswith("not run")
    report = gpu_decode.gpu_report(result, command="test")
    assert read_report(write_report(report, tmp_path, png=False)[0]).report is not None


# -- serving-path tuning: coalesced streamed tokens ---------------------------------------------


async def _chunks(items):
    for item in items:
        yield item
        await asyncio.sleep(0)


def _coalesced(chunks, every: int, interval_s: float = 0.0, clock=None) -> list[dict]:
    from deployments.events import coalesce

    async def collect() -> list[dict]:
        extra = {"clock": clock} if clock else {}
        return [e async for e in coalesce(_chunks(chunks), lambda: every, interval_s, **extra)]

    return asyncio.run(collect())


def test_tokens_per_event_follows_the_load():
    from deployments.model import ModelServer

    server = object.__new__(ModelServer.func_or_class)  # no model: only the policy

    class Engine:
        running = 0

        def stats(self):
            return self

    server.engine, server.frames_per_step, server._every = Engine(), 4, (0.0, 1)
    for running, every in ((0, 1), (4, 1), (5, 2), (16, 4), (32, 8)):
        server.engine.running, server._every = running, (0.0, 1)
        assert server._tokens_per_event() == every
    server.frames_per_step, server._every = 0, (0.0, 1)
    assert server._tokens_per_event() == 1


def test_coalescing_keeps_text_and_ids():
    from slimserve.engine import StreamChunk

    parts = [StreamChunk("He", [1]), StreamChunk("", [2]), StreamChunk("llo", [3])]
    parts += [StreamChunk(" w", [4]), StreamChunk("orld", [5], "length")]
    chunks = [(0, c) for c in parts]
    per_token = _coalesced(chunks, 1)  # few streams: one event per token with text
    assert [e["text"] for e in per_token] == ["He", "llo", " w", "orld"]
    assert [e["token_ids"] for e in per_token] == [[1], [2, 3], [4], [5]]  # held id kept
    merged = _coalesced(chunks, 2)  # busy: the first delta at once, then every 2 chunks
    assert [e["text"] for e in merged] == ["He", "llo", " world"]
    assert [e["token_ids"] for e in merged] == [[1], [2, 3], [4, 5]]
    assert merged[-1]["finish_reason"] == "length"
    assert [e["text"] for e in _coalesced(chunks, 100)] == ["He", "llo world"]
    two = [(i % 2, StreamChunk(t, [k])) for k, (i, t) in enumerate(enumerate("abcd"))]
    two += [(0, StreamChunk("", [9], "stop")), (1, StreamChunk("", [8], "stop"))]
    events = _coalesced(two, 100)
    text = {i: "".join(e["text"] for e in events if e["index"] == i) for i in (0, 1)}
    assert text == {0: "ac", 1: "bd"}
    assert {e["index"] for e in events if e["finish_reason"] == "stop"} == {0, 1}


def test_light_load_frames_are_at_least_the_interval_apart():
    from slimserve.engine import StreamChunk

    chunks = [(0, StreamChunk(c, [k])) for k, c in enumerate("abcdefg")]
    chunks += [(0, StreamChunk("h", [7], "length"))]
    ticks = iter([0.000, 0.005, 0.010, 0.021, 0.022, 0.030, 0.041, 0.045, 0.050] + [1.0] * 9)
    events = _coalesced(chunks, 1, 0.010, clock=lambda: next(ticks))
    # "a" at once; then a frame only once 10 ms passed since the last one; "h" ends at once.
    assert "".join(e["text"] for e in events) == "abcdefgh"
    assert [e["text"] for e in events][0] == "a" and events[-1]["finish_reason"] == "length"
    assert len(events) < len(chunks)
    assert [e["text"] for e in _coalesced(chunks, 1, 0.0)] == list("abcdefgh")  # rule off
