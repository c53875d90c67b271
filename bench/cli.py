"""`slimserve bench ...`: the benchmarks' verb, registered with the core CLI as a
`slimserve.verbs` entry point (the core CLI may not import `bench`)."""

from __future__ import annotations

import argparse
import sys

from slimserve.cli import Verb, load_profile_arg

WHAT = ["engine", "variants", "serving", "baseline", "race", "gpu", "all"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "what",
        choices=WHAT,
        help="engine: continuous batching vs HF generate; variants: per-variant latency, "
        "memory, size, quality; serving / baseline: the load generator against Serve / the "
        "older Flask server; race: both; gpu: eager vs CUDA-graph decode; all: `make bench`",
    )
    p.add_argument(
        "--variant",
        default=None,
        help="variant to benchmark / serve (default: the profile's default_variant)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=None,
        help="concurrency levels (default 1 4 16; serving benches 1 4 16 32)",
    )
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed repeats (median; engine 3, variants 5)"
    )
    p.add_argument(
        "--requests-per-client", type=int, default=4, help="serving: requests per client a level"
    )
    p.add_argument(
        "--serve-config", default="serve_config.yaml", help="serving: the Serve config to run"
    )
    p.add_argument("--report-dir", default="reports", help="where the reports are written")


def run_engine_bench(args: argparse.Namespace) -> int:
    from bench.engine_bench import main as engine_main
    from slimserve.artifacts import ArtifactStore

    profile = load_profile_arg(args.config, args.artifacts)
    store = ArtifactStore(profile.artifacts_root(), profile.name)
    variant = args.variant or profile.default_variant
    folder = store.path(variant)
    if store.manifest(variant) is None:
        raise FileNotFoundError(f"{variant} is not built: run `make artifacts`")
    result = engine_main(
        folder,
        concurrencies=tuple(args.concurrency or (1, 4, 16)),
        max_tokens=args.max_tokens,
        repeats=args.repeats or 3,
        report_dir=args.report_dir,
    )
    return result or 0


def run(args: argparse.Namespace) -> int:
    if args.what == "engine":
        return run_engine_bench(args)
    from bench.run_all import PARTS, BenchPlan, run_all

    if args.what not in PARTS:
        raise ValueError(f"unknown benchmark {args.what!r}")
    plan = BenchPlan(
        config=args.config,
        serve_config=args.serve_config,
        artifacts=args.artifacts,
        variant=args.variant,
        reports_dir=args.report_dir,
        parts=PARTS[args.what],
        concurrencies=tuple(args.concurrency or (1, 4, 16, 32)),
        max_tokens=args.max_tokens,
        requests_per_client=args.requests_per_client,
        repeats=args.repeats or 5,
        command=" ".join(["slimserve", *sys.argv[1:]]) if sys.argv[1:] else None,
    )
    run_all(plan)
    return 0


VERB = Verb("bench", "benchmarks (writes reports/)", add_arguments, run)
