"""`POST /compare`: one prompt through several variants, measured one after another.

Variants run sequentially after one short untimed warm-up each: run concurrently on a small
machine they would share its cores and every timing would measure the neighbours. Timings come
from the engine inside each replica (submit to first token, submit to end), so the HTTP and
Ray hops, which are the same for every variant, do not dilute the differences.

The teacher is the reference: it is run too when deployed (even if not asked for), `speedup`
is its latency over each variant's, and `agreement` is the fraction of generated positions
where the variant's token equals the teacher's greedy pick given the same prefix (the
variant's own prompt + output), scored by the teacher in one forward pass per variant.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from deployments.errors import ApiError
from deployments.messages import job, sampling
from slimserve.protocol import CompareRequest, CompareResponse, CompareResult

if TYPE_CHECKING:
    from deployments.ingress import Ingress


async def run(ing: Ingress, req: CompareRequest) -> CompareResponse:
    if not ing.models:
        raise ApiError(404, f"no model is deployed: {ing.message or 'see GET /v1/models'}")
    names = list(dict.fromkeys(req.models or ing.models))
    for name in names:
        ing.handle(name)  # 404 naming what is deployed
    reference = ing.teacher if ing.teacher in ing.models else None
    if reference is not None and reference not in names:
        names.insert(0, reference)
    deadline = ing.deadline()
    params = sampling(req)
    if req.warmup:
        warm = {**params, "max_tokens": min(req.max_tokens, ing.settings.compare_warmup_tokens)}
        for name in names:
            # An error here is reported by the timed run below, against this variant.
            with contextlib.suppress(ApiError):
                await _generate(ing, name, job(req.prompt, warm), deadline)
    runs: dict[str, dict[str, Any]] = {}
    results: list[CompareResult] = []
    for name in names:
        payload = {**job(req.prompt, params), "return_prompt_ids": True}
        try:
            runs[name] = out = await _generate(ing, name, payload, deadline)
        except ApiError as exc:
            if exc.data["status"] == 408:
                raise
            results.append(CompareResult(model=name, error=exc.data["message"]))
            continue
        choice, timings = out["choices"][0], out["timings"]
        results.append(
            CompareResult(
                model=name,
                text=choice["text"],
                token_ids=choice["token_ids"],
                completion_tokens=out["usage"]["completion_tokens"],
                latency_s=timings["e2e_s"],
                ttft_s=timings["ttft_s"],
                tokens_per_s=timings["tokens_per_s"],
            )
        )
    ref_run = runs.get(reference) if reference else None
    for result in results:
        if ref_run is None or result.error is not None:
            continue
        if result.latency_s:
            result.speedup = ref_run["timings"]["e2e_s"] / result.latency_s
        result.agreement = await _agreement(ing, reference, ref_run, runs[result.model], deadline)
    devices = {c.id: c.device for c in ing.cards if c.id in names}
    return CompareResponse(
        prompt=req.prompt,
        reference=reference,
        results=results,
        machine={**ing.machine, "devices": devices, "timed_by": "engine, inside each replica"},
    )


async def _generate(
    ing: Ingress, name: str, payload: dict[str, Any], deadline: float
) -> dict[str, Any]:
    handle = ing.handle(name)
    return await ing.call(lambda: handle.generate.remote(payload), deadline)


async def _agreement(
    ing: Ingress,
    reference: str | None,
    ref_run: dict[str, Any],
    run: dict[str, Any],
    deadline: float,
) -> float | None:
    """Top-1 agreement with the teacher over the variant's generated positions."""
    tokens = run["choices"][0]["token_ids"]
    if reference is None or not tokens or run["prompt_ids"] != ref_run["prompt_ids"]:
        return None  # nothing generated, or another tokenizer: positions do not line up
    handle = ing.handle(reference)
    picks = await ing.call(lambda: handle.top1.remote(run["prompt_ids"], tokens), deadline)
    return sum(int(a == b) for a, b in zip(picks, tokens, strict=True)) / len(tokens)
