"""`slimserve sweep prune ...`: the pruning sweep's verb, registered with the core CLI as a
`slimserve.verbs` entry point (the core CLI may not import `build_engines`)."""

from __future__ import annotations

import argparse

from slimserve.cli import Verb, load_profile_arg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["prune"], help="prune: L1 amounts and structured ratios")
    p.add_argument(
        "--parent", default=None, help="variant to prune (default: the profile's default_variant)"
    )
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


def run(args: argparse.Namespace) -> int:
    """Pruning sweep: quality and speed per amount / ratio -> reports/prune_sweep.*"""
    from build_engines.sweep import DEFAULT_AMOUNTS, run_prune_sweep
    from slimserve.reports import render_markdown

    report, _ = run_prune_sweep(
        load_profile_arg(args.config, args.artifacts),
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


VERB = Verb("sweep", "pruning sweep: perplexity, agreement, speed (reports/)", add_arguments, run)
