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
from typing import Any, Protocol

from ray.serve.handle import DeploymentHandle

from deployments.errors import ApiError
from deployments.messages import job, sampling
from deployments.replica_client import ReplicaClient
from slimserve.protocol import CompareRequest, CompareResponse, CompareResult, ModelCard


class Deployed(Protocol):
    """What `/compare` reads of the deployed variants (the ingress provides it)."""

    models: dict[str, DeploymentHandle]
    cards: list[ModelCard]
    teacher: str
    message: str | None
    machine: dict[str, Any]

    def handle(self, model: str) -> DeploymentHandle:
        """The deployment serving `model`, or a 404 saying what is deployed."""
        ...


async def run(
    client: ReplicaClient, deployed: Deployed, req: CompareRequest, *, warmup_tokens: int
) -> CompareResponse:
    """The compare answer; `client` makes the replica calls (deadline, retries, errors)."""
    if not deployed.models:
        raise ApiError(404, f"no model is deployed: {deployed.message or 'see GET /v1/models'}")
    names = list(dict.fromkeys(req.models or deployed.models))
    for name in names:
        deployed.handle(name)  # 404 naming what is deployed
    reference = deployed.teacher if deployed.teacher in deployed.models else None
    if reference is not None and reference not in names:
        names.insert(0, reference)
    deadline = client.deadline()
    params = sampling(req)
    if req.warmup:
        warm = {**params, "max_tokens": min(req.max_tokens, warmup_tokens)}
        for name in names:
            # An error here is reported by the timed run below, against this variant.
            with contextlib.suppress(ApiError):
                await _generate(client, deployed.handle(name), job(req.prompt, warm), deadline)
    runs: dict[str, dict[str, Any]] = {}
    results: list[CompareResult] = []
    for name in names:
        payload = {**job(req.prompt, params), "return_prompt_ids": True}
        try:
            runs[name] = out = await _generate(client, deployed.handle(name), payload, deadline)
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
        result.agreement = await _agreement(
            client, deployed, reference, ref_run, runs[result.model], deadline
        )
    devices = {c.id: c.device for c in deployed.cards if c.id in names}
    return CompareResponse(
        prompt=req.prompt,
        reference=reference,
        results=results,
        machine={**deployed.machine, "devices": devices, "timed_by": "engine, inside each replica"},
    )


async def _generate(
    client: ReplicaClient, handle: DeploymentHandle, payload: dict[str, Any], deadline: float
) -> dict[str, Any]:
    return await client.call(lambda: handle.generate.remote(payload), deadline)


async def _agreement(
    client: ReplicaClient,
    deployed: Deployed,
    reference: str | None,
    ref_run: dict[str, Any],
    run: dict[str, Any],
    deadline: float,
) -> float | None:
    """Top-1 agreement with the teacher over the variant's generated positions."""
    tokens = run["choices"][0]["token_ids"]
    if reference is None or not tokens or run["prompt_ids"] != ref_run["prompt_ids"]:
        return None  # nothing generated, or another tokenizer: positions do not line up
    handle = deployed.handle(reference)
    picks = await client.call(lambda: handle.top1.remote(run["prompt_ids"], tokens), deadline)
    return sum(int(a == b) for a, b in zip(picks, tokens, strict=True)) / len(tokens)
