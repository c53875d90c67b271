"""`reports/training.{json,md}`: what the training steps of a build produced, with samples.

Written by `slimserve build --report-dir reports` (what `make artifacts` runs) after a build
that trained something, from the manifests alone plus a few greedy samples, so the README's
training table and samples are measured by the build, not copied by hand.

Quality goals checked in the notes: the teacher's test perplexity at most `TEACHER_GOAL` × the
unigram perplexity of the same tokenizer on the same split, and each distilled student at most
`STUDENT_GOAL` × the teacher's and no worse than its CE-only twin (same init, data, budget).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimserve.artifacts import ArtifactStore, Manifest
from slimserve.catalogue import Profile
from slimserve.reports import Report, Table, new_report

TEACHER_GOAL = 0.25
STUDENT_GOAL = 1.25
TRAINING_STEPS = ("finetune", "distill")
SAMPLE_PROMPTS = ("The Python interpreter", "A list is", "The function returns")
SAMPLE_TOKENS = 24


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def _row(name: str, m: Manifest, teacher_ppl: float | None) -> dict[str, Any]:
    d, ppl = m.details, m.metrics.perplexity
    seconds, tokens = d.get("seconds"), d.get("tokens")
    ce = d.get("ce_only") or {}
    return {
        "variant": name,
        "step": m.step,
        "params": m.params_total,
        "tokens trained": tokens,
        "stop": d.get("stop_reason", "token budget"),
        "train s": seconds,
        "tokens/s": d.get("tokens_per_s"),
        "test ppl": ppl,
        "unigram ppl": m.metrics.unigram_perplexity,
        "ppl / unigram": _ratio(ppl, m.metrics.unigram_perplexity),
        "ppl / teacher": _ratio(ppl, teacher_ppl) if m.step == "distill" else None,
        "agreement": m.metrics.agreement,
        "CE-only ppl": getattr(m.metrics, "ce_only_perplexity", None),
        "CE-only train s": ce.get("seconds"),
        "build s": m.build_seconds,
    }


def _notes(rows: list[dict[str, Any]]) -> list[str]:
    notes = []
    for r in rows:
        if r["step"] == "finetune" and r["ppl / unigram"] is not None:
            ok = r["ppl / unigram"] <= TEACHER_GOAL
            notes.append(
                f"{r['variant']}: test perplexity {r['test ppl']:.2f} = {r['ppl / unigram']:.3f} × "
                f"unigram (goal <= {TEACHER_GOAL}): {'met' if ok else 'MISSED'}"
            )
        if r["step"] == "distill" and r["ppl / teacher"] is not None:
            ok = r["ppl / teacher"] <= STUDENT_GOAL
            ce = r["CE-only ppl"]
            beats = ce is None or r["test ppl"] <= ce
            notes.append(
                f"{r['variant']}: {r['ppl / teacher']:.3f} × the teacher's perplexity (goal <= "
                f"{STUDENT_GOAL}): {'met' if ok else 'MISSED'}; CE-only twin "
                f"{'-' if ce is None else f'{ce:.2f}'}: KD {'<=' if beats else 'WORSE than'} CE-only"
            )
    return notes


def greedy_samples(folder: Path, prompts: tuple[str, ...] = SAMPLE_PROMPTS) -> list[str]:
    """Greedy continuations of `prompts` by the HF model in `folder` (stock classes only)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt").input_ids
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=SAMPLE_TOKENS,
                do_sample=False,
                pad_token_id=tok.eos_token_id,
            )
            out.append(tok.decode(gen[0, ids.shape[1] :]))
    return out


def training_report(
    profile: Profile, store: ArtifactStore, build_seconds: float | None = None
) -> Report | None:
    """The report of every built training variant of `profile` (None when none is built)."""
    built = {
        name: m
        for name, v in profile.variants.items()
        if v.step in TRAINING_STEPS and (m := store.manifest(name)) is not None
    }
    if not built:
        return None
    teacher = built.get(profile.teacher)
    teacher_ppl = teacher.metrics.perplexity if teacher else None
    rows = [_row(name, m, teacher_ppl) for name, m in built.items()]
    samples = [
        {"variant": name, "prompt": p, "greedy continuation": repr(text)}
        for name in built
        for p, text in zip(SAMPLE_PROMPTS, greedy_samples(store.path(name)), strict=True)
    ]
    notes = _notes(rows)
    if build_seconds is not None:
        notes.append(f"this build: {build_seconds:.0f} s of wall time for every step it ran")
    return new_report(
        "training",
        kind="training",
        title=f"Training results ({profile.name} profile)",
        tables=[
            Table.from_records("Training steps (test split)", rows),
            Table.from_records(f"Greedy samples ({SAMPLE_TOKENS} tokens)", samples),
        ],
        notes=notes,
    )
