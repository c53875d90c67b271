"""lm-evaluation-harness tasks built from a profile's own test split (no hub needed).

Two tasks, written as YAML + JSON Lines into a work folder that lm-eval reads with
`TaskManager(include_path=folder)` and `dataset_path: json`:

* `slimserve_next_words` (multiple choice over contexts, as Winogrande is built): the
  `answer_words` words that follow a place in a test document, and `choices` contexts: the
  text that really precedes them and distractor contexts ending elsewhere in the split. The
  model scores the same continuation after each context and picks the context under which it
  is likeliest (`acc`). Scoring one continuation under several contexts measures the use of
  context alone: scoring several continuations after one context would mostly reward the
  continuation that is likely anywhere (frequent words), whatever the model read before.
  The continuation starts with one space and has its inner whitespace collapsed.
* `slimserve_perplexity` (loglikelihood_rolling): the test documents cut at word boundaries
  into chunks short enough to fit the model's context in one window, so a server and an
  in-process model score exactly the same token windows. lm-eval reports word and byte
  perplexity and bits per byte; each chunk's token count is kept (`n_tokens`) for a token
  perplexity comparable with the manifest's.

Everything is drawn with `random.Random(seed)`: the same split and spec give the same files.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

MC_TASK = "slimserve_next_words"
PPL_TASK = "slimserve_perplexity"
_WORD = re.compile(r"\S+")

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class TaskSpec:
    """How the two tasks are cut from the test split (defaults: the tiny profile, 128 tokens)."""

    items: int = 200  # multiple-choice questions
    choices: int = 4  # answers per question: the true one and choices - 1 distractors
    context_tokens: int = 64  # a question's context, at most this many tokens
    answer_words: int = 6  # words per answer
    chunk_tokens: int = 96  # a perplexity chunk, at most this many tokens
    ppl_tokens: int = 16384  # perplexity chunks until this many tokens of the split
    seed: int = 0

    @property
    def answer_tokens(self) -> int:
        """The most tokens a question's continuation may have (longer ones are skipped)."""
        return 8 * self.answer_words

    def check(self, context_length: int) -> None:
        """Every request must fit the model's context with lm-eval's own margins."""
        problems = []
        if self.choices < 2:
            problems.append("choices must be >= 2")
        if self.items < 1 or self.answer_words < 1 or self.context_tokens < 1:
            problems.append("items, answer_words and context_tokens must be >= 1")
        # a window is the prefix token + the chunk; the API model keeps 2 tokens back
        if self.chunk_tokens + 3 > context_length:
            problems.append(f"chunk_tokens + 3 must fit the context ({context_length})")
        if self.context_tokens + self.answer_tokens + 2 > context_length:
            problems.append(f"context_tokens + 8 x answer_words + 2 > context ({context_length})")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class TaskFiles:
    """What `write_tasks` wrote: the folder for `include_path`, and each task's data."""

    folder: Path
    tasks: tuple[str, str]
    mc_items: int
    ppl_chunks: int
    ppl_tokens: int


def split_documents(tokens: Sequence[int], eos_id: int, decode: Callable[[list[int]], str]):
    """The test split's documents as text: its token array cut at EOS and decoded."""
    docs, current = [], []
    for t in tokens:
        if int(t) == eos_id:
            if current:
                docs.append(decode(current))
            current = []
        else:
            current.append(int(t))
    if current:
        docs.append(decode(current))
    return [d for d in docs if d.strip()]


def _spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _WORD.finditer(text)]


def _answer(text: str, spans: list[tuple[int, int]], i: int, n: int) -> str:
    return " " + " ".join(text[a:b] for a, b in spans[i : i + n])


def _context(text: str, spans, i: int, max_tokens: int, encode: Encode) -> str | None:
    """The longest run of whole words ending before word `i` within `max_tokens` tokens."""
    k = min(i, max_tokens)  # a word is at least one token
    while k > 0:
        ctx = text[spans[i - k][0] : spans[i - 1][1]]
        if len(encode(ctx)) <= max_tokens:
            return ctx
        k = k * 3 // 4 if k > 8 else k - 1
    return None


def multiple_choice_items(docs: list[str], spec: TaskSpec, encode: Encode) -> list[dict]:
    """`spec.items` questions: {id, contexts, continuation, label}: `contexts[label]` is the
    text that really precedes `continuation`; the distractor contexts differ from it and from
    each other."""
    rng = random.Random(spec.seed)
    spans = [_spans(d) for d in docs]
    n = spec.answer_words
    positions = [(d, i) for d, s in enumerate(spans) for i in range(8, len(s) - n + 1)]
    if len(positions) < spec.items + spec.choices:
        raise ValueError(f"the test split has {len(positions)} answer positions, too few")
    rng.shuffle(positions)
    items: list[dict] = []
    for d, i in positions:
        if len(items) == spec.items:
            break
        context = _context(docs[d], spans[d], i, spec.context_tokens, encode)
        continuation = _answer(docs[d], spans[d], i, n)
        # 6 "words" of code can be 70 tokens: such a question would not fit the context
        # and each path would cut it differently
        if context is None or len(encode(continuation)) > spec.answer_tokens:
            continue
        wrong: list[str] = []
        for _ in range(100 * spec.choices):  # a split of few distinct contexts must not hang
            d2, j = positions[rng.randrange(len(positions))]
            other = _context(docs[d2], spans[d2], j, spec.context_tokens, encode)
            if other is not None and other != context and other not in wrong:
                wrong.append(other)
            if len(wrong) == spec.choices - 1:
                break
        else:
            raise ValueError(f"too few distinct contexts for {spec.choices} choices")
        label = rng.randrange(spec.choices)
        items.append(
            {
                "id": len(items),
                "contexts": [*wrong[:label], context, *wrong[label:]],
                "continuation": continuation,
                "label": label,
            }
        )
    return items


def perplexity_chunks(docs: list[str], spec: TaskSpec, encode: Encode) -> list[dict]:
    """Documents cut at word boundaries into chunks of at most `spec.chunk_tokens` tokens,
    in split order, until `spec.ppl_tokens` tokens: {id, text, n_tokens}."""
    chunks: list[dict] = []
    total = 0
    for text in docs:
        spans = _spans(text)
        start = 0
        while start < len(spans) and total < spec.ppl_tokens:
            end, best = start + 1, None
            while end <= len(spans):  # grow one word at a time while it fits
                piece = text[spans[start][0] : spans[end - 1][1]]
                count = len(encode(piece))
                if count > spec.chunk_tokens:
                    break
                best = (end, piece, count)
                end += 1
            if best is None:  # one word longer than a chunk: skipped
                start += 1
                continue
            end, piece, count = best
            chunks.append({"id": len(chunks), "text": piece, "n_tokens": count})
            total += count
            start = end
    return chunks


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _task_yaml(name: str, data: Path, cache: Path, body: dict) -> dict:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(cache)},
        "test_split": "test",
        **body,
        "metadata": {"version": 1},
    }


def write_tasks(folder: Path, docs: list[str], spec: TaskSpec, encode: Encode) -> TaskFiles:
    """Write both tasks' YAML and JSON Lines (and the spec, for the record) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    items = multiple_choice_items(docs, spec, encode)
    chunks = perplexity_chunks(docs, spec, encode)
    mc_data, ppl_data, cache = folder / "next_words.jsonl", folder / "perplexity.jsonl", folder
    _write_jsonl(mc_data, items)
    _write_jsonl(ppl_data, chunks)
    mc = {  # doc_to_text giving an int (the gold index) makes lm-eval score each context
        "output_type": "multiple_choice",
        "doc_to_text": "label",
        "doc_to_choice": "contexts",
        "doc_to_target": "continuation",
        "target_delimiter": "",  # the continuation carries its own leading space
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    ppl = {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": [
            {"metric": m, "aggregation": agg, "higher_is_better": False}
            for m, agg in (
                ("word_perplexity", "weighted_perplexity"),
                ("byte_perplexity", "weighted_perplexity"),
                ("bits_per_byte", "bits_per_byte"),
            )
        ],
    }
    for name, data, body in ((MC_TASK, mc_data, mc), (PPL_TASK, ppl_data, ppl)):
        text = yaml.safe_dump(_task_yaml(name, data, cache / ".hf-datasets", body), sort_keys=False)
        (folder / f"{name}.yaml").write_text(text)
    (folder / "spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return TaskFiles(
        folder, (MC_TASK, PPL_TASK), len(items), len(chunks), sum(c["n_tokens"] for c in chunks)
    )
