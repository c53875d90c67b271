"""Hostile input (reliability/matrix.py): deep nesting, huge numbers, NaN, surrogates, invalid
UTF-8, control characters, odd token lists, path-like model names. Never a 5xx, every error in
the envelope, and the service answers normally afterwards. (test_bad_input.py has the plainer
field-by-field matrix; these are the cases a fuzzer rarely builds.)"""

from __future__ import annotations

import httpx
import pytest

from reliability.matrix import MATRIX, OK, check


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=60) as c:
        yield c


@pytest.mark.parametrize("case", MATRIX, ids=[c.id for c in MATRIX])
def test_hostile_request_is_answered_without_a_5xx(serve_urls, client, case):
    assert check(case, case.send(serve_urls.main, client)) is None


def test_matrix_covers_the_issue_list():
    ids = {c.id for c in MATRIX}
    for needed in (
        "deep-list",
        "nan-penalty",
        "lone-surrogate",
        "invalid-utf8-in-string",
        "control-chars",
        "ids-vocab-edge",
        "model-traversal",
        "prompt-over-cap",
    ):
        assert needed in ids
    assert len(MATRIX) >= 50


def test_service_answers_normally_after_the_matrix(serve_urls, client):
    for case in MATRIX:
        case.send(serve_urls.main, client)
    r = client.post(f"{serve_urls.main}/v1/completions", json={**OK, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert client.get(f"{serve_urls.main}/healthz").json()["status"] == "ok"
