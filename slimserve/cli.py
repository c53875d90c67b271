"""`slimserve` command line: a thin layer over typed functions (one verb each).

    slimserve build    --config configs/tiny.yaml [--only V] [--force] [--dry-run] [--report-dir reports]
    slimserve eval     --config configs/tiny.yaml [--variant V]
    slimserve data     --config configs/tiny.yaml
    slimserve generate --config configs/tiny.yaml --variant student "prompt"
    slimserve bench    engine --variant student
    slimserve sweep    prune --config configs/tiny.yaml [--amounts 0.1 0.5 0.9]

The core verbs live here. Verbs of the layers above the core (`bench` in `bench/cli.py`,
`sweep` in `build_engines/cli.py`) register themselves as `slimserve.verbs` entry points in
pyproject.toml, so this module never imports upward: each is a `Verb` found at start-up.

Exit status: 0 ok, 2 bad input (config, arguments, artifacts), 1 anything else.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points

DEFAULT_CONFIG = "configs/tiny.yaml"
VERB_GROUP = "slimserve.verbs"


@dataclass(frozen=True)
class Verb:
    """One `slimserve VERB`: its one-line help, its options and the function that runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def load_profile_arg(path: str, artifacts: str | None):
    """The profile at `path`, its artifacts folder overridden by `--artifacts` when given."""
    from slimserve.catalogue import load_profile

    profile = load_profile(path)
    if artifacts:
        profile.artifacts_dir = artifacts
    return profile


def add_common(p: argparse.ArgumentParser) -> None:
    """`--config` and `--artifacts`, which every verb takes."""
    p.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"profile file (default {DEFAULT_CONFIG})"
    )
    p.add_argument("--artifacts", default=None, help="override the profile's artifacts_dir")


def cmd_build(args: argparse.Namespace) -> int:
    from slimserve.runner import build, table
    from slimserve.training_report import TRAINING_STEPS, training_report

    profile = load_profile_arg(args.config, args.artifacts)
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

    profile = load_profile_arg(args.config, args.artifacts)
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

    profile = load_profile_arg(args.config, args.artifacts)
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

    profile = load_profile_arg(args.config, args.artifacts)
    args.variant = args.variant or profile.default_variant
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


def _build_arguments(p: argparse.ArgumentParser) -> None:
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


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", default=None, help="one variant (default: every built one)")


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--variant", default=None, help="variant to run (default: the profile's default_variant)"
    )
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (>= 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, (0, 1]")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch / ORT threads")
    p.add_argument("prompt", help="the prompt text")


CORE_VERBS: tuple[Verb, ...] = (
    Verb(
        "build", "build missing or stale variants in dependency order", _build_arguments, cmd_build
    ),
    Verb(
        "data",
        "prepare the tokenized corpus; print its size and SHA-256",
        lambda p: None,
        cmd_data,
    ),
    Verb("eval", "measure perplexity and agreement; update manifests", _eval_arguments, cmd_eval),
    Verb(
        "generate",
        "stream a completion from a built variant",
        _generate_arguments,
        cmd_generate,
    ),
)


def plugin_verbs() -> list[Verb]:
    """The verbs other packages register under the `slimserve.verbs` entry-point group."""
    found = sorted(entry_points(group=VERB_GROUP), key=lambda ep: ep.name)
    return [ep.load() for ep in found]


def all_verbs() -> tuple[Verb, ...]:
    return (*CORE_VERBS, *plugin_verbs())


def make_parser(verbs: Iterable[Verb] | None = None) -> argparse.ArgumentParser:
    """The `slimserve` parser: one sub-command per verb (default: the core and every plugin)."""
    parser = argparse.ArgumentParser(
        prog="slimserve",
        description="Fine-tune, distil, prune, compile and serve GPT-2-family models on Ray.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in all_verbs() if verbs is None else verbs:
        p = sub.add_parser(verb.name, help=verb.help)
        add_common(p)
        verb.add_arguments(p)
        p.set_defaults(func=verb.run)
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
