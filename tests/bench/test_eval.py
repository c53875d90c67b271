"""`make eval`'s pure parts: the generated tasks, the Pareto front, API-vs-in-process agreement
and the report; then one real lm-eval run (`hf` model) on a tiny GPT-2 over generated tasks."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from bench.eval_report import (
    committed_serving,
    compare,
    eval_report,
    pareto_front,
    write_eval,
)
from bench.eval_run import Scores
from bench.eval_tasks import (
    MC_TASK,
    PPL_TASK,
    TaskSpec,
    multiple_choice_items,
    perplexity_chunks,
    split_documents,
    write_tasks,
)
from slimserve.reports import read_report

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
]


def docs(n: int = 6, words: int = 300) -> list[str]:
    """Documents whose word i is WORDS[(i * (d + 2)) % 15]: distinct, with line breaks."""
    out = []
    for d in range(n):
        ws = [WORDS[(i * (d + 2) + d) % len(WORDS)] for i in range(words)]
        out.append("\n".join(" ".join(ws[i : i + 12]) for i in range(0, words, 12)))
    return out


def encode(text: str) -> list[int]:
    """A stand-in tokenizer for the pure tests: one token per 3 characters."""
    return list(range(math.ceil(len(text) / 3)))


SPEC = TaskSpec(items=40, choices=4, context_tokens=30, answer_words=3, chunk_tokens=40,
                ppl_tokens=600, seed=1)  # fmt: skip


def test_task_files_are_deterministic_and_the_seed_changes_them(tmp_path):
    a = write_tasks(tmp_path / "a", docs(), SPEC, encode)
    b = write_tasks(tmp_path / "b", docs(), SPEC, encode)
    for name in ("next_words.jsonl", "perplexity.jsonl"):
        assert (a.folder / name).read_text() == (b.folder / name).read_text()
    other = write_tasks(tmp_path / "c", docs(), TaskSpec(**{**SPEC.__dict__, "seed": 2}), encode)
    assert (other.folder / "next_words.jsonl").read_text() != (
        a.folder / "next_words.jsonl"
    ).read_text()
    assert a.tasks == (MC_TASK, PPL_TASK) and a.mc_items == 40
    for task in a.tasks:
        text = (a.folder / f"{task}.yaml").read_text()
        assert f"task: {task}" in text and "dataset_path: json" in text
        assert str(a.folder) in text  # absolute data_files: lm-eval reads them from anywhere


def test_questions_hold_the_true_context_among_distinct_distractors():
    corpus = docs()
    items = multiple_choice_items(corpus, SPEC, encode)
    assert len(items) == SPEC.items
    flat = [" ".join(d.split()) for d in corpus]
    for item in items:
        contexts, label, cont = item["contexts"], item["label"], item["continuation"]
        assert len(contexts) == SPEC.choices and 0 <= label < SPEC.choices
        assert len(set(contexts)) == SPEC.choices  # distractors differ from the true one
        assert cont.startswith(" ") and len(cont.split()) == SPEC.answer_words
        assert len(encode(cont)) <= SPEC.answer_tokens  # context + continuation fit
        assert all(0 < len(encode(c)) <= SPEC.context_tokens for c in contexts)
        true = " ".join(contexts[label].split())
        assert any(true + cont in d for d in flat)  # the words that really follow
    assert len({i["label"] for i in items}) > 1  # the answer is not always in one place


def test_perplexity_chunks_fit_and_cover_the_documents_in_order():
    corpus = docs(2, 200)
    chunks = perplexity_chunks(corpus, TaskSpec(chunk_tokens=40, ppl_tokens=10_000), encode)
    assert all(0 < c["n_tokens"] == len(encode(c["text"])) <= 40 for c in chunks)
    words = [w for c in chunks for w in c["text"].split()]
    assert words == [w for d in corpus for w in d.split()]  # nothing lost, nothing repeated
    capped = perplexity_chunks(corpus, TaskSpec(chunk_tokens=40, ppl_tokens=100), encode)
    assert sum(c["n_tokens"] for c in capped) < 100 + 40


def test_a_split_without_enough_distinct_contexts_is_refused_not_looped():
    repetitive = ["a " * 20] * 3  # every 4-token context is "a a a a"
    spec = TaskSpec(items=2, choices=4, context_tokens=4, answer_words=3)
    with pytest.raises(ValueError, match="distinct"):
        multiple_choice_items(repetitive, spec, encode)


def test_spec_refuses_what_cannot_fit_the_context():
    with pytest.raises(ValueError, match="chunk_tokens"):
        TaskSpec(chunk_tokens=126).check(128)
    with pytest.raises(ValueError, match="choices"):
        TaskSpec(choices=1).check(128)
    TaskSpec().check(128)


def test_split_documents_cuts_at_eos():
    assert split_documents([5, 6, 0, 0, 7, 0, 8], 0, lambda ids: "x" * len(ids)) == [
        "xx",
        "x",
        "x",
    ]


def test_pareto_front_keeps_exactly_the_undominated_points():
    points = {
        "fast": (100.0, 0.5),
        "good": (10.0, 0.9),
        "both": (50.0, 0.8),
        "dominated": (40.0, 0.7),  # "both" is faster and better
        "tie-slower": (50.0, 0.6),  # as fast as "both", worse
        "twin": (50.0, 0.8),  # equal to "both": neither dominates the other
        "unmeasured": (None, 0.99),
    }
    assert pareto_front(points) == {"fast", "good", "both", "twin"}
    assert pareto_front({"only": (1.0, 0.1)}) == {"only"}
    assert pareto_front({}) == set()


def scores(acc: float, ppl: float, lls: list[list[float]]) -> Scores:
    return Scores(acc, 0.01, ppl * 4, ppl / 2, 1.0, ppl, 1.0, lls)


def test_compare_agrees_only_within_the_tolerance():
    lls = [[-1.0, -2.0], [-3.0, -1.5]]
    same = compare(scores(0.5, 100.0, lls), scores(0.5, 100.05, lls))  # 0.05 %
    assert same["agree"] and same["same_pick"] == "2/2" and same["max_abs_ll_diff"] == 0
    far = compare(scores(0.5, 100.0, lls), scores(0.5, 100.2, lls))  # 0.2 %
    assert not far["agree"] and far["max_ppl_rel_diff_pct"] == pytest.approx(0.8 / 4.008, 1e-3)
    flipped = compare(scores(0.5, 100.0, lls), scores(1.0, 100.0, [[-1.0, -2.0], [-1.0, -2.0]]))
    assert not flipped["agree"] and flipped["same_pick"] == "1/2"


def test_report_joins_quality_speed_and_sources_and_draws_the_picture(tmp_path):
    peers = {
        "commit": "abc1234",
        "tables": [
            {
                "title": "student (tiny): every level",
                "columns": ["server", "stream", "concurrency", "out_tok_s", "e2e_p50_ms"],
                "rows": [
                    ["slimserve", False, 16, 1662.0, 610.8],
                    ["slimserve", True, 16, 1535.0, 675.0],
                    ["slimserve-onnx", False, 4, 957.0, 261.0],
                    ["vllm", False, 16, 1341.0, 727.5],
                ],
            }
        ],
    }
    (tmp_path / "bench_peers.json").write_text(json.dumps(peers))
    committed = committed_serving(tmp_path)
    assert committed == (
        {"student": {"tok_s": 1662.0, "e2e_p50_ms": 610.8}},
        "bench_peers.json @ abc1234",
    )
    lls = [[-1.0, -2.0]]
    variants = {
        "student": {"runtime": "torch", "bytes": 10_000_000, "perplexity": 190.0, "agreement": 0.7},
        "student-int8": {"runtime": "onnxruntime", "bytes": 3_000_000, "perplexity": 191.0},
    }
    report = eval_report(
        variants=variants,
        api={"student": scores(0.8, 190.0, lls), "student-int8": scores(0.7, 192.0, lls)},
        local={"student": scores(0.8, 190.0, lls)},
        load={
            "student": {"out_tok_s": 1500.0, "e2e_p50_ms": 600.0, "failed": 0},
            "student-int8": {"out_tok_s": 2500.0, "e2e_p50_ms": 400.0, "failed": 0},
        },
        committed=committed,
        facts={"tasks": "t", "load": "l"},
        command="test",
    )
    quality = report.tables[0].records()
    assert [r["variant"] for r in quality] == ["student", "student-int8"]
    assert all(r["pareto"] for r in quality)  # faster-but-worse and slower-but-better
    assert quality[1]["mb_on_disk"] == 3.0 and quality[0]["agreement"] == 0.7
    assert report.tables[2].records()[0]["agree"] is True
    assert report.tables[3].records()[0]["committed_tok_s_16"] == 1662.0
    assert "abc1234" in str(report.tables[4].rows)
    without_local = eval_report(
        variants=variants,
        api={"student": scores(0.8, 190.0, lls)},
        local={},
        load={},
        committed=({}, ""),
        facts={},
    )
    titles = [t.title for t in without_local.tables]
    assert titles[0].startswith("Quality for speed") and not any("in-process" in t for t in titles)
    paths = write_eval(report, tmp_path / "out")
    assert [p.name for p in paths] == ["eval.json", "eval.md", "eval.png"]
    assert read_report(paths[0]).report is not None
    assert "![" in paths[1].read_text() and paths[2].stat().st_size > 10_000


def _tiny_builder():
    path = ROOT / "tests" / "slimserve" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_slimserve_tiny_fixtures_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(240)
def test_lm_eval_hf_run_matches_a_direct_torch_computation(tmp_path):
    """lm-eval's `hf` model over generated tasks: its per-choice log-likelihoods and our token
    perplexity equal the same sums computed here straight from the model's logits."""
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-eval is not installed (pip install -e '.[eval]')")
    import torch
    from transformers import GPT2LMHeadModel

    from bench.eval_run import hf_model_args, run_lm_eval
    from slimserve.tokenizer import load_tokenizer

    fixtures = _tiny_builder()
    folder = fixtures.build_tiny_model(tmp_path / "tiny")
    tok = load_tokenizer(folder)
    corpus = [" ".join(fixtures._corpus(30, seed=s)) for s in range(4)]
    spec = TaskSpec(items=12, choices=3, context_tokens=40, answer_words=3, chunk_tokens=60,
                    ppl_tokens=400)  # fmt: skip
    files = write_tasks(tmp_path / "tasks", corpus, spec, tok.encode)
    got = run_lm_eval("hf", hf_model_args(folder, folder, 128), files, batch_size=4)
    model = GPT2LMHeadModel.from_pretrained(folder).eval()

    def loglik(context: list[int], target: list[int]) -> float:
        ids = torch.tensor([context + target])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        picked = logp[len(context) - 1 :, :].gather(1, torch.tensor(target)[:, None])
        return float(picked.sum())

    first = json.loads((files.folder / "next_words.jsonl").read_text().splitlines()[0])
    cont = first["continuation"]
    want = []
    for context in first["contexts"]:
        ctx = tok.encode(context)
        want.append(loglik(ctx, tok.encode(context + cont)[len(ctx) :]))
    assert got.choice_lls[0] == pytest.approx(want, abs=1e-3)
    chunks = [json.loads(x) for x in (files.folder / "perplexity.jsonl").read_text().splitlines()]
    total = sum(loglik([tok.eos_token_id], tok.encode(c["text"])) for c in chunks)
    expected = math.exp(-total / sum(c["n_tokens"] for c in chunks))
    assert got.token_perplexity == pytest.approx(expected, rel=1e-4)
    assert 0 <= got.acc <= 1 and len(got.picks()) == spec.items
