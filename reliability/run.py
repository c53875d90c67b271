"""`make reliability`: every reliability run on one local Serve, one report.

    python -m reliability.run [--quick] [--soak-s 600] [--artifacts-dir DIR]

It starts its own Ray (`address="local"`, so it never joins another cluster on the machine)
and Serve on a free port on 127.0.0.1, deploys the variant under test with two replicas
(every other variant disabled), and runs, in order: broken artifacts (planner only), hostile
input (schemathesis + the matrix), replica faults under load (ray.kill, then SIGKILL),
overload (an open-loop load past the queue limits) and the soak. It writes
`reports/reliability.{json,md}` and exits 1 when a target is missed.
`--quick` (or RELIABILITY_QUICK=1) shortens every phase for a smoke run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from reliability import broken, faults, hostile, overload, soak

APP = "reliability"
SERVE_CONFIG = Path(__file__).resolve().parents[1] / "serve_config.yaml"
PHASES = ("broken", "hostile", "faults", "overload", "soak")
BODY = {"prompt": "The Python interpreter", "max_tokens": 16, "temperature": 0.7}


def _args(argv: list[str] | None) -> argparse.Namespace:
    quick = os.environ.get("RELIABILITY_QUICK", "") not in ("", "0")
    p = argparse.ArgumentParser(prog="reliability", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny.yaml", help="the profile (catalogue)")
    p.add_argument("--artifacts-dir", default=None, help="default: the profile's artifacts_dir")
    p.add_argument("--variant", default="student", help="the variant under test")
    p.add_argument("--quick", action="store_true", default=quick, help="short smoke run")
    p.add_argument(
        "--soak-s",
        type=float,
        default=float(os.environ.get("RELIABILITY_SOAK_S", 0)) or None,
        help="soak duration (default 600, quick 60)",
    )
    p.add_argument("--rate", type=float, default=20.0, help="fault-run requests per second")
    p.add_argument("--fault-s", type=float, default=None, help="each fault run (60; quick 20)")
    p.add_argument(
        "--overload-rate",
        type=float,
        default=30.0,
        help="overload req/s of 100-token requests: past the replicas' capacity, within the "
        "HTTP front door's (on a shared 2-core machine 80 req/s saturates the proxy itself)",
    )
    p.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated subset of {','.join(PHASES)} (default: all)",
    )
    p.add_argument("--reports", default="reports", help="where reliability.{json,md} go")
    a = p.parse_args(argv)
    a.phases = [x.strip() for x in a.phases.split(",") if x.strip()]
    if unknown := set(a.phases) - set(PHASES):
        p.error(f"unknown phases: {', '.join(sorted(unknown))}")
    a.soak_s = a.soak_s or (60.0 if a.quick else 600.0)
    a.fault_s = a.fault_s or (20.0 if a.quick else 60.0)
    a.fuzz_examples = (
        80  # per operation and mode; parameterless routes exhaust early (> 500 in all)
    )
    a.overload_s = 20.0 if a.quick else 30.0  # long enough to fill the queues
    return a


def serve_env(path: Path = SERVE_CONFIG) -> dict[str, str]:
    """Ray Serve's request-path switches that `serve run serve_config.yaml` gives the controller
    (`controller_options.runtime_env.env_vars`), so this run measures the same request path."""
    import yaml

    config = yaml.safe_load(path.read_text()) or {}
    runtime_env = (config.get("controller_options") or {}).get("runtime_env") or {}
    return {k: str(v) for k, v in (runtime_env.get("env_vars") or {}).items()}


def _serve(a: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Ray + Serve on 127.0.0.1, the variant under test with two replicas; (url, settings)."""
    import socket

    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions

    from deployments.app import build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.update(serve_env())  # before Ray starts: every Ray process inherits them
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=port, request_timeout_s=180))
    variant = {
        "enabled": True,
        "replicas": 2,
        "num_cpus": 0.5,
        "max_batch_size": 8,
        "max_queued_requests": 128,  # absorbs the ~20 s without one replica at 20 req/s
        "health_check_period_s": 2,
        "health_check_timeout_s": 20,
    }
    args = {
        "config": a.config,
        "artifacts_dir": a.artifacts_dir,
        "defaults": {"enabled": False},
        "variants": {a.variant: variant},
        "ingress": {"request_timeout_s": 120},
    }
    serve.run(build_app(args), name=APP, route_prefix="/")
    return f"http://127.0.0.1:{port}", variant


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    from deployments.app import plan
    from slimserve.reports import Table, new_report, write_report

    a = _args(argv)
    deployment = plan({"config": a.config, "artifacts_dir": a.artifacts_dir})
    plans, catalogue = deployment.variants, deployment.catalogue()
    card = next(p.card for p in plans if p.card.id == a.variant)
    if not card.deployed:
        print(f"{a.variant} cannot be served: {card.reason}")
        return 2
    store = Path(catalogue["machine"]["artifacts"])
    notes = [f"load average at start: {_load()} (2-core machine shared with other jobs)"]
    notes.append(f"Serve switches from serve_config.yaml: {serve_env() or 'none'}")
    tables: list[Table] = []
    t_start = time.monotonic()

    verdicts: dict[str, bool] = {}
    if "broken" in a.phases:
        with tempfile.TemporaryDirectory() as work:
            rows = broken.sweep(
                Path(a.config), catalogue["profile"], store.parent, Path(work), a.variant
            )
        tables.append(Table.from_records("Broken artifacts (planner)", rows))
        verdicts["broken artifacts all unavailable, others deploy"] = all(
            r["as_expected"] for r in rows
        )
        print(f"broken artifacts: {sum(r['as_expected'] for r in rows)}/{len(rows)} as expected")

    base, variant = _serve(a)
    body = {**BODY, "model": a.variant}
    try:
        if "hostile" in a.phases:
            notes.append(f"load average before hostile input: {_load()}")
            _hostile(base, a, tables, notes, verdicts)
        if "faults" in a.phases:
            fault_rows = []
            for mode in ("kill", "crash"):
                notes.append(f"load average before fault run ({mode}): {_load()}")
                row = faults.fault_run(
                    base, APP, a.variant, mode, rate=a.rate, seconds=a.fault_s, body=body
                )
                fault_rows.append(row)
                print("fault", mode, row)
            tables.append(Table.from_records("Replica faults under load", fault_rows))
            lost = sum(r["plain_lost"] + r["stream_lost"] for r in fault_rows)
            verdicts["faults: 0 lost"] = lost == 0
            verdicts["faults: 0 failed non-streamed"] = all(
                r["plain_failed"] == 0 for r in fault_rows
            )
            verdicts["faults: 0 streams failed before their first frame"] = all(
                r["stream_failed"] == r["stream_failed_mid_stream"] for r in fault_rows
            )
        if "overload" in a.phases:
            notes.append(f"load average before overload: {_load()}")
            over = overload.overload_run(
                base, {**body, "max_tokens": 100}, a.overload_rate, a.overload_s
            )
            tables.append(Table.from_records("Overload (open loop past capacity)", [over]))
            print("overload", over)
            verdicts["overload: the queue limit was reached (some 503s)"] = over["rejected_503"] > 0
            verdicts["overload: 503 p99 < 100 ms"] = over["p99_503_ms"] < 100
            verdicts["overload: every 503 has Retry-After"] = (
                over["with_retry_after"] == over["rejected_503"]
            )
            verdicts["overload: accepted requests finish"] = (
                over["accepted_failed"] == 0 and over["lost"] == 0
            )
        if "soak" in a.phases:
            notes.append(f"load average before soak: {_load()}")
            concurrency = 2 * 2 * variant["max_batch_size"]  # replicas x max_ongoing_requests
            warmup = 10.0 if a.quick else 60.0
            sk = soak.soak_run(
                base,
                APP,
                a.variant,
                body,
                concurrency=concurrency,
                seconds=a.soak_s,
                warmup_s=warmup,
            )
            tables.append(Table.from_records("Soak at the edge of capacity", [sk]))
            print("soak", sk)
            verdicts["soak: RSS growth < 10 %"] = sk["max_rss_growth_pct"] < 10
    finally:
        from ray import serve

        serve.shutdown()
        import ray

        ray.shutdown()

    tables.insert(
        0, Table.from_records("Targets", [{"target": k, "met": v} for k, v in verdicts.items()])
    )
    notes.append(f"load average at end: {_load()}; wall time {time.monotonic() - t_start:.0f} s")
    notes.append(
        f"mode: {'quick' if a.quick else 'full'}; phases {','.join(a.phases)}; soak {a.soak_s:g} s; faults "
        f"{a.rate:g} req/s for {a.fault_s:g} s each; variant {a.variant} x 2 replicas"
    )
    report = new_report(
        "reliability",
        kind="reliability",
        title=f"Reliability: faults, overload, soak, hostile input ({catalogue['profile']})",
        tables=tables,
        notes=notes,
    )
    paths = write_report(report, a.reports, png=False)
    print("wrote", ", ".join(map(str, paths)))
    missed = [k for k, v in verdicts.items() if not v]
    for k in missed:
        print("MISSED:", k)
    return 1 if missed else 0


def _hostile(
    base: str,
    a: argparse.Namespace,
    tables: list[Any],
    notes: list[str],
    verdicts: dict[str, bool],
) -> None:
    from slimserve.reports import Table

    fuzz = hostile.fuzz(base, a.fuzz_examples)
    mat = hostile.matrix(base)
    rows = [
        _hostile_row("schemathesis (positive + negative)", fuzz),
        _hostile_row("hand-written matrix", mat),
    ]
    tables.append(Table.from_records("Hostile input", rows))
    notes += [f"hostile: {p}" for p in fuzz["problems"] + mat["problems"]]
    notes.append(
        f"after the hostile input a normal request answered: {mat['answers_normally_after']}"
    )
    verdicts["hostile: zero 5xx, every error enveloped"] = (
        not fuzz["problems"] and not mat["problems"]
    )
    verdicts["hostile: >= 500 generated cases"] = fuzz["cases"] >= 500
    verdicts["hostile: answers normally afterwards"] = mat["answers_normally_after"]
    errors = fuzz["server_errors"] + mat["server_errors"]
    print("hostile:", fuzz["cases"], "generated,", mat["cases"], "matrix, 5xx:", errors)


def _hostile_row(name: str, r: dict[str, Any]) -> dict[str, Any]:
    return {
        "suite": name,
        "cases": r["cases"],
        "statuses": ", ".join(f"{k}: {v}" for k, v in r["statuses"].items()),
        "server_errors": r["server_errors"],
        "problems": len(r["problems"]),
    }


if __name__ == "__main__":
    raise SystemExit(main())
