"""`slimserve` command line: a thin layer over typed functions (one verb each).

    slimserve build    --config configs/tiny.yaml [--only V] [--force] [--dry-run] [--report-dir reports]
    slimserve eval     --config configs/tiny.yaml [--variant V]
    slimserve data     --config configs/tiny.yaml
    slimserve generate --config configs/tiny.yaml --variant student "prompt"
    slimserve bench    engine --variant student
    slimserve sweep    prune --config configs/tiny.yaml [--amounts 0.1 0.5 0.9]

Exit status: 0 ok, 2 bad input (config, arguments, artifacts), 1 anything else.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

DEFAULT_CONFIG = "configs/tiny.yaml"


def _profile(path: str, artifacts: str | None):
    from slimserve.catalogue import load_profile

    profile = load_profile(path)
    if artifacts:
        profile.artifacts_dir = artifacts
    return profile


def cmd_build(args: argparse.Namespace) -> int:
    from slimserve.runner import build, table
    from slimserve.training_report import TRAINING_STEPS, training_report

    profile = _profile(args.config, args.artifacts)
    start = time.time()
    rows = build(profile, only=args.only, force=args.force, dry_run=args.dry_run)
    if args.dry_run:
        return cmd_data(args) if args.corpus_stats else 0
    print(table(rows))
    trained = any(r.status == "built" and r.step in TRAINING_STEPS for r in rows)
    if args.report_dir and trained:
        from slimserve.artifacts import ArtifactStore
        from slimserve.reports import write_report

        store = ArtifactStore(profile.artifacts_root(), profile.name)
        report = training_report(profile, store, build_seconds=time.time() - start)
        if report is not None:
            paths = write_report(report, args.report_dir, png=False)
            print("training report: " + ", ".join(str(p) for p in paths))
            for note in report.notes:
                print(f"  {note}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Prepare (or reuse) the tokenized corpus and print its provenance."""
    from slimserve.data import prepare

    profile = _profile(args.config, args.artifacts)
    bundle = prepare(profile, log=lambda m: print(m, file=sys.stderr))
    s = bundle.stats
    print(f"source: {s['source']}")
    print(f"sha256: {bundle.sha256}")
    print(f"vocab:  {s['vocab_size']}")
    for split, v in s["splits"].items():
        print(
            f"{split:10s} {v['documents']:6,} documents {v['chars']:12,} chars {v['tokens']:10,} tokens"
        )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Re-measure built variants and write the figures into their manifests."""
    from slimserve.artifacts import ArtifactError, ArtifactStore, Metrics, write_manifest
    from slimserve.data import prepare
    from slimserve.evaluate import evaluate_folder

    profile = _profile(args.config, args.artifacts)
    store = ArtifactStore(profile.artifacts_root(), profile.name)
    names = [args.variant] if args.variant else profile.order()
    if args.variant and args.variant not in profile.variants:
        raise ValueError(f"--variant: no variant {args.variant!r} in {profile.name}")
    data = prepare(profile, log=lambda m: print(m, file=sys.stderr))
    for name in names:
        m = store.manifest(name)
        if m is None:
            if args.variant:
                raise ArtifactError(f"{name} is not built: run `slimserve build --only {name}`")
            continue
        teacher = None if name == profile.teacher else store.path(profile.teacher)
        metrics = evaluate_folder(store.path(name), profile, data, teacher)
        m.metrics = Metrics(**{**m.metrics.model_dump(), **metrics})
        write_manifest(store.path(name), m)
        print(
            f"{name:22s} perplexity {metrics['perplexity']:10.2f}  "
            f"unigram {metrics['unigram_perplexity']:10.2f}  agreement {metrics['agreement']:.3f}"
        )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from slimserve.artifacts import ArtifactStore
    from slimserve.generate_cli import generate_main
    from slimserve.sampling import SamplingParams

    profile = _profile(args.config, args.artifacts)
    if args.variant not in profile.variants:
        raise ValueError(
            f"--variant: no variant {args.variant!r} (have: {', '.join(profile.variants)})"
        )
    store = ArtifactStore(profile.artifacts_root(), profile.name)
    if store.manifest(args.variant) is None:
        raise FileNotFoundError(f"{args.variant} is not built: run `make artifacts`")
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop or [],
    )
    generate_main(store.path(args.variant), args.prompt, params, args.threads)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from slimserve.artifacts import ArtifactStore

    profile = _profile(args.config, args.artifacts)
    store = ArtifactStore(profile.artifacts_root(), profile.name)
    if args.what == "engine":
        from bench.engine_bench import main as engine_main

        folder = store.path(args.variant)
        if store.manifest(args.variant) is None:
            raise FileNotFoundError(f"{args.variant} is not built: run `make artifacts`")
        return (
            engine_main(
                folder,
                concurrencies=tuple(args.concurrency or (1, 4, 16)),
                max_tokens=args.max_tokens,
                repeats=args.repeats or 3,
            )
            or 0
        )
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


def cmd_sweep(args: argparse.Namespace) -> int:
    """Pruning sweep: quality and speed per amount / ratio -> reports/prune_sweep.*"""
    from build_engines.sweep import DEFAULT_AMOUNTS, run_prune_sweep
    from slimserve.reports import render_markdown

    report, _ = run_prune_sweep(
        _profile(args.config, args.artifacts),
        parent=args.parent,
        amounts=args.amounts or DEFAULT_AMOUNTS,
        scope=args.scope,
        structured=not args.no_structured,
        importance=args.importance,
        repeats=args.repeats,
        threads=args.threads,
        reports_dir=args.report_dir,
    )
    print(render_markdown(report, f"{report.name}.png" if report.charts else None))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"profile file (default {DEFAULT_CONFIG})"
    )
    p.add_argument("--artifacts", default=None, help="override the profile's artifacts_dir")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimserve",
        description="Fine-tune, distil, prune, compile and serve GPT-2-family models on Ray.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("build", help="build missing or stale variants in dependency order")
    _common(p)
    p.add_argument("--only", default=None, help="build only this variant (and what it needs)")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.add_argument("--dry-run", action="store_true", help="print the plan, build nothing")
    p.add_argument(
        "--corpus-stats",
        action="store_true",
        help="with --dry-run: also prepare the corpus and print its size and hash",
    )
    p.add_argument(
        "--report-dir",
        default=None,
        help="after a build that trained a variant, write <dir>/training.{json,md} "
        "(tokens, time, perplexity vs unigram and teacher, greedy samples); off by default",
    )
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("data", help="prepare the tokenized corpus; print its size and SHA-256")
    _common(p)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("eval", help="measure perplexity and agreement; update manifests")
    _common(p)
    p.add_argument("--variant", default=None, help="one variant (default: every built one)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="stream a completion from a built variant")
    _common(p)
    p.add_argument("--variant", default="student", help="variant to run (default student)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (>= 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, (0, 1]")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch / ORT threads")
    p.add_argument("prompt", help="the prompt text")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="benchmarks (writes reports/)")
    _common(p)
    p.add_argument(
        "what",
        choices=["engine", "variants", "serving", "baseline", "race", "gpu", "all"],
        help="engine: continuous batching vs HF generate; variants: per-variant latency, "
        "memory, size, quality; serving / baseline: the load generator against Serve / the "
        "older Flask server; race: both; gpu: eager vs CUDA-graph decode; all: `make bench`",
    )
    p.add_argument("--variant", default="student", help="variant to benchmark / serve")
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
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("sweep", help="pruning sweep: perplexity, agreement, speed (reports/)")
    _common(p)
    p.add_argument("what", choices=["prune"], help="prune: L1 amounts and structured ratios")
    p.add_argument("--parent", default="student", help="variant to prune (default student)")
    p.add_argument(
        "--amounts", type=float, nargs="+", help="L1 amounts in (0, 1) (default 0.1-0.9)"
    )
    p.add_argument("--scope", choices=["global", "layer"], default="global", help="L1 ranking")
    p.add_argument("--no-structured", action="store_true", help="L1 only (no structured points)")
    p.add_argument(
        "--importance", choices=["activation", "weight"], default="activation", help="neuron score"
    )
    p.add_argument("--repeats", type=int, default=5, help="decode timing runs (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for decode timing")
    p.add_argument("--report-dir", default="reports", help="where prune_sweep.* are written")
    p.set_defaults(func=cmd_sweep)
    return parser


BAD_INPUT: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    from slimserve.artifacts import ArtifactError
    from slimserve.data import DataError

    args = make_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ArtifactError, DataError, *BAD_INPUT) as exc:
        print(f"slimserve {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"slimserve {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
