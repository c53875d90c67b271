"""`make eval` (`python -m bench.eval`): lm-evaluation-harness on every served variant.

1. Tasks: a multiple-choice next-words task and a perplexity task, cut from the profile's
   own test split (`bench/eval_tasks.py`) and written into a work folder; nothing is fetched.
2. In process: lm-eval's `hf` model on every built torch variant (before Serve starts, so
   nothing else competes for the cores).
3. Through the API: `serve_config.yaml` started the way `make bench` starts it (private Ray,
   free ports), or a running ingress given with `--url`; lm-eval's `local-completions` model
   on every deployed variant, then the same closed-loop load as `make bench` at 16 clients
   for each variant's served tokens/s and p50 latency.
4. `reports/eval.{json,md,png}` (`bench/eval_report.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.eval_report import committed_serving, eval_report, write_eval
from bench.eval_run import Scores, api_model_args, hf_model_args, run_lm_eval
from bench.eval_tasks import TaskFiles, TaskSpec, split_documents, write_tasks
from slimserve.cli import DEFAULT_CONFIG, load_profile_arg


@dataclass
class EvalPlan:
    """What one `make eval` run does (defaults: the tiny profile, every variant)."""

    config: str = DEFAULT_CONFIG
    serve_config: str = "serve_config.yaml"
    artifacts: str | None = None
    url: str | None = None  # a running ingress; None = start serve_config here
    reports_dir: str = "reports"
    work_dir: str = "artifacts/eval"
    spec: TaskSpec = field(default_factory=TaskSpec)
    only: list[str] | None = None  # these variants only
    in_process: bool = True
    concurrent: int = 8  # lm-eval's requests in flight against the API
    hf_batch: int = 16
    threads: int = 1  # torch threads of the in-process runs
    load_clients: int = 16
    load_requests_per_client: int = 4
    load_max_tokens: int = 64
    command: str | None = None
    loads: list[str] = field(default_factory=list)

    def load(self, when: str) -> None:
        one, five, fifteen = os.getloadavg()
        self.loads.append(f"{when}: {one:.2f}, {five:.2f}, {fifteen:.2f}")


def built_variants(profile: Any) -> dict[str, dict[str, Any]]:
    """Every built variant: runtime, folder, bytes on disk and the manifest's metrics."""
    from slimserve.artifacts import ArtifactStore

    store = ArtifactStore(profile.artifacts_root(), profile.name)
    out = {}
    for name in profile.variants:
        manifest = store.manifest(name)
        if manifest is None:
            continue
        out[name] = {
            "runtime": manifest.runtime,
            "folder": store.path(name),
            "bytes": manifest.bytes,
            "perplexity": manifest.metrics.perplexity,
            "agreement": manifest.metrics.agreement,
        }
    return out


def prepare_tasks(plan: EvalPlan, profile: Any) -> tuple[TaskFiles, Path]:
    """Write the tasks from the profile's test split; returns them and the tokenizer folder."""
    from slimserve.data import prepare

    bundle = prepare(profile)
    tok = bundle.tokenizer()
    docs = split_documents(bundle.tokens("test"), tok.eos_token_id, tok.decode)
    plan.spec.check(profile.block_size)
    files = write_tasks(Path(plan.work_dir) / profile.name, docs, plan.spec, tok.encode)
    print(f"tasks: {files.mc_items} questions, {files.ppl_chunks} perplexity chunks "
          f"({files.ppl_tokens} tokens) in {files.folder}", flush=True)  # fmt: skip
    return files, bundle.tokenizer_dir


def deployed(url: str) -> list[str]:
    with urllib.request.urlopen(f"{url.rstrip('/')}/v1/models", timeout=10) as r:
        return [c["id"] for c in json.loads(r.read())["data"] if c.get("deployed")]


@contextlib.contextmanager
def serving(plan: EvalPlan, need: list[str]) -> Iterator[str]:
    """The ingress URL: `--url`, or serve_config.yaml started here until the block ends."""
    if plan.url:
        yield plan.url
        return
    from bench.run_all import start_serve

    with start_serve(plan.serve_config, config=plan.config, artifacts_dir=plan.artifacts,
                     need=need) as url:  # fmt: skip
        yield url


def serve_load(plan: EvalPlan, url: str, variant: str) -> dict[str, Any]:
    """`make bench`'s closed-loop load on one variant: non-streamed, greedy, 16 clients."""
    from bench.serving import run_level

    level = asyncio.run(
        run_level(
            url,
            model=variant,
            concurrency=plan.load_clients,
            requests=plan.load_clients * plan.load_requests_per_client,
            stream=False,
            max_tokens=plan.load_max_tokens,
        )
    )
    return level.row()


def run_eval(plan: EvalPlan) -> list[Path]:
    profile = load_profile_arg(plan.config, plan.artifacts)
    variants = built_variants(profile)
    if plan.only:
        variants = {k: v for k, v in variants.items() if k in plan.only}
    if not variants:
        raise SystemExit("no built variant to evaluate: run `make artifacts` first")
    files, tok_dir = prepare_tasks(plan, profile)
    ctx = profile.block_size
    plan.load("start")
    local: dict[str, Scores] = {}
    if plan.in_process:
        import torch

        # One thread, as each replica runs: on 2 shared cores, 2 threads spin-waiting for each
        # other took twice as long for the same work.
        torch.set_num_threads(plan.threads)
    for name, info in variants.items():
        if plan.in_process and info["runtime"] == "torch":
            args = hf_model_args(info["folder"], tok_dir, ctx)
            local[name] = run_lm_eval("hf", args, files, batch_size=plan.hf_batch)
            print(f"in-process {name}: {local[name].row()}", flush=True)
    api: dict[str, Scores] = {}
    load: dict[str, dict[str, Any]] = {}
    torch_first = sorted(variants, key=lambda v: variants[v]["runtime"] != "torch")
    with serving(plan, torch_first[:1]) as url:
        served = [v for v in deployed(url) if v in variants]
        plan.load("serving")
        for name in served:
            args = api_model_args(url, name, tok_dir, ctx, plan.concurrent)
            api[name] = run_lm_eval("local-completions", args, files, batch_size=1)
            print(f"api {name}: {api[name].row()}", flush=True)
        for name in served:
            load[name] = serve_load(plan, url, name)
            print(f"load {name}: {load[name]['out_tok_s']} tok/s at {plan.load_clients} "
                  f"clients, p50 {load[name]['e2e_p50_ms']} ms", flush=True)  # fmt: skip
        plan.load("after the load")
    facts = {
        "tasks": f"{files.mc_items} next-words questions ({plan.spec.choices} contexts of <= "
        f"{plan.spec.context_tokens} tokens before the same {plan.spec.answer_words} words), "
        f"{files.ppl_chunks} perplexity chunks of <= {plan.spec.chunk_tokens} tokens "
        f"({files.ppl_tokens} tokens), seed {plan.spec.seed}",
        "load": f"closed loop, {plan.load_clients} clients, "
        f"{plan.load_clients * plan.load_requests_per_client} non-streamed requests of "
        f"{plan.load_max_tokens} greedy tokens per variant, one variant at a time",
        "notes": [f"Load average {' | '.join(plan.loads)}."],
    }
    report = eval_report(
        variants=variants,
        api=api,
        local=local,
        load=load,
        committed=committed_serving(Path(plan.reports_dir)),
        facts=facts,
        command=plan.command,
    )
    paths = write_eval(report, plan.reports_dir)
    for p in paths:
        print(f"wrote {p}")
    return paths


def parse_args(argv: list[str] | None = None) -> EvalPlan:
    p = argparse.ArgumentParser(prog="python -m bench.eval", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=DEFAULT_CONFIG, help="profile file")
    p.add_argument("--artifacts", default=None, help="override the profile's artifacts_dir")
    p.add_argument("--serve-config", default="serve_config.yaml", help="the Serve config to run")
    p.add_argument("--url", default=None, help="a running ingress instead of starting Serve")
    p.add_argument("--report-dir", default="reports", help="where eval.{json,md,png} go")
    p.add_argument("--work-dir", default="artifacts/eval", help="where the task files go")
    p.add_argument("--only", nargs="+", default=None, help="evaluate these variants only")
    p.add_argument("--no-in-process", action="store_true", help="skip lm-eval's hf model")
    p.add_argument("--items", type=int, default=200, help="multiple-choice questions")
    p.add_argument("--choices", type=int, default=4, help="answers per question")
    p.add_argument("--ppl-tokens", type=int, default=16384, help="test tokens for perplexity")
    p.add_argument("--seed", type=int, default=0, help="seed of the task draw")
    p.add_argument("--concurrent", type=int, default=8, help="lm-eval requests in flight")
    p.add_argument("--threads", type=int, default=1, help="torch threads in process")
    p.add_argument("--load-clients", type=int, default=16, help="clients of the speed load")
    a = p.parse_args(argv)
    spec = TaskSpec(items=a.items, choices=a.choices, ppl_tokens=a.ppl_tokens, seed=a.seed)
    return EvalPlan(
        config=a.config,
        serve_config=a.serve_config,
        artifacts=a.artifacts,
        url=a.url,
        reports_dir=a.report_dir,
        work_dir=a.work_dir,
        spec=spec,
        only=a.only,
        in_process=not a.no_in_process,
        concurrent=a.concurrent,
        threads=a.threads,
        load_clients=a.load_clients,
        command=" ".join(["python -m bench.eval", *(argv if argv is not None else sys.argv[1:])]),
    )


def main(argv: list[str] | None = None) -> int:
    run_eval(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
