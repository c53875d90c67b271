"""The peers report's targets against llama-server, CTranslate2 and the engine alone, its
readings of int8 against llama-server's q8_0, and its memory table, on plain rows."""

from __future__ import annotations

from bench.peers_report import llama_targets, memory_table, peers_report
from tests.bench.test_peers import _rows  # levels at 1 and 16 clients, streamed 0.9x

SETTINGS = {"max_tokens": 8, "min_requests": 2, "requests_per_client": 1}


FLOOR = [
    {"model": "student", "engine": "slimserve engine (torch, float32)", "one_ms_per_token": 0.8},
    {
        "model": "student-onnx",
        "engine": "slimserve engine (onnxruntime, float32)",
        "one_ms_per_token": 0.5,
        "batch_tok_s": 4000.0,
    },
    {"model": "student", "engine": "CTranslate2 4.8.5 (float32)", "one_ms_per_token": 0.2},
    {"model": "student", "engine": "CTranslate2 4.8.5 (int8)", "one_ms_per_token": 0.1},
]


def test_llama_targets_take_the_fastest_slimserve_variant():
    tiny = {
        "slimserve": _rows(100, 60),
        "slimserve-onnx": _rows(200, 40),
        "llama-server": _rows(160, 20),
    }
    big = {
        "slimserve": _rows(10, 1),
        "slimserve-onnx": _rows(20, 1),
        "slimserve-int8": _rows(50, 1),
        "llama-server": _rows(25, 1),
    }
    goals = {g["target"]: g for g in llama_targets(tiny, big, FLOOR, 1.01)}
    fast = goals["student, 16 clients: fastest slimserve variant vs llama-server, non-streamed"]
    assert fast["measured"] == 1.25 and fast["met"] is True  # student-onnx: 3200 / 2560
    one = goals["student, 1 client: fastest slimserve variant's e2e p50 vs llama-server's"]
    assert one["measured"] == 2.0 and one["met"] is False and one["miss"] == "60% over"
    served = goals[
        "student-onnx, 16 clients: served tok/s vs its engine alone (16 prompts, one batch)"
    ]
    assert served["measured"] == 0.8 and served["met"] is True  # 3200 / 4000
    engine = goals["student, engine alone: fastest variant's ms/token vs CTranslate2 float32's"]
    assert engine["measured"] == 2.5 and engine["met"] is False  # 0.5 / 0.2, not int8's 0.1
    big16 = "124M-shaped, 16 clients: best float32 slimserve variant vs llama-server, streamed"
    assert goals[big16]["measured"] == 0.8  # int8 is not a float32 variant
    ms = goals["124M-shaped, 1 client: best float32 slimserve variant's ms/token vs llama-server's"]
    assert ms["measured"] == 1.25 and ms["met"] is False  # 25 / 20 tok/s
    int8 = goals["124M-shaped, 1 client: int8 decode speed vs float32 ONNX (tokens/s)"]
    assert int8["measured"] == 2.5 and int8["met"] is True
    ppl = goals["int8 perplexity vs float32 (tiny profile: student-onnx-int8 / student-onnx)"]
    assert ppl["measured"] == 1.01 and ppl["met"] is True


def test_llama_targets_without_the_peers_are_not_measured():
    goals = llama_targets({"slimserve": _rows(100, 60)}, {})
    assert goals and all(g["met"] is None and g["miss"] == "not measured" for g in goals)


def test_report_has_memory_int8_readings_and_every_target():
    big = {
        "slimserve-onnx": _rows(20, 1),
        "slimserve-int8": _rows(50, 1),
        "llama-server-q8": _rows(40, 1),
    }
    memory = [
        {"model": "m", "process": "m-onnx", "rss_mib": 700.0, "peak_rss_mib": 750.0}
        | {"processes": 1, "folder_mib": 480.0},
        {"model": "m", "process": "vllm", "rss_mib": 2000.0, "peak_rss_mib": 2100.0}
        | {"processes": 2},
    ]
    peer = {"peer": "vLLM", "status": "installed"}
    report = peers_report(
        {}, big, peer=peer, greedy=[], settings=SETTINGS, command=None, floor=FLOOR,
        memory=memory, int8_ppl_ratio=1.2,
    )  # fmt: skip
    table = next(t for t in report.tables if t.title.startswith("memory"))
    assert table.rows[0] == ["m", "m-onnx", 700.0, 750.0, 1, 480.0]
    assert table.rows[1][-1] is None
    assert memory_table([]).rows == []
    assert any(n.startswith("Memory: each process's resident set") for n in report.notes)
    assert (
        "124M-shaped, 1 client(s): slimserve-int8 / llama-server-q8 tok/s = 1.25x "
        "non-streamed, 1.25x streamed."
    ) in report.notes
    targets = next(t for t in report.tables if t.title == "targets")
    assert len(targets.rows) == 19
    assert (
        "target missed: int8 perplexity vs float32 (tiny profile: student-onnx-int8 / "
        "student-onnx): 1.2x (14% over)"
    ) in report.notes
