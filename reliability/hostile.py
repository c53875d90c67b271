"""Hostile input under `make reliability`: schemathesis against the ingress's /openapi.json,
then the hand-written matrix (reliability/matrix.py), then a normal request.

schemathesis generates requests from the schema for every route: positive cases (valid by the
schema, so they reach the replicas) and negative ones (each violating it somewhere). Every
answer must be below 500 and, when an error, in the envelope with `code` = the status.
`max_tokens` (and `max_new_tokens`, `n`) are capped in generated bodies so the run stays short.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import httpx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from reliability.matrix import MATRIX, OK, check

if TYPE_CHECKING:
    from reliability.context import Run

CAPS = {"max_tokens": 8, "max_completion_tokens": 8, "max_new_tokens": 4, "n": 2}


def _cap(body: Any) -> Any:
    """Positive cases keep their shape; only the numbers that cost generation time shrink."""
    if isinstance(body, dict):
        for key, cap in CAPS.items():
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > cap:
                body[key] = cap
    return body


def fuzz(base: str, per_operation: int) -> dict[str, Any]:
    """schemathesis over every operation, positive and negative; counts and problems."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    statuses: Counter[int] = Counter()
    problems: list[str] = []
    per_route: Counter[str] = Counter()
    tally = (statuses, problems)
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            label = f"{op.label} [{mode}]"
            _fuzz_operation(op.as_strategy(generation_mode=mode), base, per_operation, label, tally)
            per_route[op.label] += 1
    return {
        "cases": sum(statuses.values()),
        "routes": len(per_route),
        "statuses": dict(sorted(statuses.items())),
        "server_errors": sum(n for s, n in statuses.items() if s >= 500),
        "problems": problems,
    }


def _fuzz_operation(
    strategy: Any,
    base: str,
    examples: int,
    label: str,
    tally: tuple[Counter[int], list[str]],
) -> None:
    """Send `examples` generated cases of one operation; count statuses, keep problems."""
    statuses, problems = tally

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        case.body = _cap(case.body)
        response = case.call(base_url=base, timeout=60)
        statuses[response.status_code] += 1
        problem = _problem(response.status_code, response.text)
        if problem and len(problems) < 20:
            problems.append(f"{label}: {problem}")

    # Negative cases of a route without parameters cannot exist: hypothesis says Unsatisfiable.
    with contextlib.suppress(Unsatisfiable):
        run()


def _problem(status: int, text: str) -> str | None:
    if status >= 500:
        return f"{status}: {text[:160]}"
    if status >= 400:
        import json

        try:
            err = json.loads(text)["error"]
            if err["code"] != status or not err["message"]:
                return f"bad envelope {err}"
        except (ValueError, KeyError, TypeError):
            return f"{status} without the envelope: {text[:160]}"
    return None


def matrix(base: str) -> dict[str, Any]:
    """The hand-written matrix, then one normal request (the service still answers)."""
    problems: list[str] = []
    statuses: Counter[int] = Counter()
    with httpx.Client(timeout=60) as client:
        for case in MATRIX:
            r = case.send(base, client)
            statuses[r.status_code] += 1
            if (why := check(case, r)) is not None:
                problems.append(why)
        t0 = time.monotonic()
        after = client.post(f"{base}/v1/completions", json={**OK, "max_tokens": 3})
        healthy = after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 3
    return {
        "cases": len(MATRIX),
        "statuses": dict(sorted(statuses.items())),
        "server_errors": sum(n for s, n in statuses.items() if s >= 500),
        "problems": problems,
        "answers_normally_after": healthy,
        "after_latency_s": round(time.monotonic() - t0, 3),
    }


def phase(run: Run) -> None:
    """Schemathesis and the hand-written matrix: no 5xx, every error in the envelope."""
    base, a = run.base, run.a
    generated = fuzz(base, a.fuzz_examples)
    mat = matrix(base)
    rows = [
        _hostile_row("schemathesis (positive + negative)", generated),
        _hostile_row("hand-written matrix", mat),
    ]
    run.table("Hostile input", rows)
    run.notes += [f"hostile: {p}" for p in generated["problems"] + mat["problems"]]
    run.notes.append(
        f"after the hostile input a normal request answered: {mat['answers_normally_after']}"
    )
    run.verdicts["hostile: zero 5xx, every error enveloped"] = (
        not generated["problems"] and not mat["problems"]
    )
    run.verdicts["hostile: >= 500 generated cases"] = generated["cases"] >= 500
    run.verdicts["hostile: answers normally afterwards"] = mat["answers_normally_after"]
    errors = generated["server_errors"] + mat["server_errors"]
    print("hostile:", generated["cases"], "generated,", mat["cases"], "matrix, 5xx:", errors)


def _hostile_row(name: str, r: dict[str, Any]) -> dict[str, Any]:
    return {
        "suite": name,
        "cases": r["cases"],
        "statuses": ", ".join(f"{k}: {v}" for k, v in r["statuses"].items()),
        "server_errors": r["server_errors"],
        "problems": len(r["problems"]),
    }
