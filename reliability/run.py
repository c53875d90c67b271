"""`make reliability`: every reliability run on one local Serve, one report.

    python -m reliability.run [--quick] [--soak-s 600] [--artifacts-dir DIR]

It starts its own Ray (`address="local"`, so it never joins another cluster on the machine)
and Serve on a free port on 127.0.0.1, deploys the variant under test (the profile's default
variant unless `--variant` names one) with two replicas (every other variant disabled), and
runs, in order: broken artifacts (planner only), hostile input (schemathesis + the matrix),
replica faults under load (ray.kill, then SIGKILL), the stream events channel cut under load,
a flood of unauthenticated connections at the events inbox, the soak, overload (the variant
redeployed with a short queue, then an open-loop load past what it was measured to sustain),
and, once its own Serve is shut down, `serve run serve_config.yaml` crashed and restarted.
It writes `reports/reliability.{json,md}` and exits 1 when a target is missed.
`--quick` (or RELIABILITY_QUICK=1) shortens every phase for a smoke run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from reliability import broken, channel_cut, faults, hostile, overload, preauth, restart, soak
from reliability.context import APP, Run
from slimserve.net import free_port

SERVE_CONFIG = Path(__file__).resolve().parents[1] / "serve_config.yaml"
# Overload is the last on the run's Serve: it redeploys the variant with a short queue, which
# the others must not see. Restart comes after the run's Serve is shut down (fixed ports).
PHASES = (
    "broken", "hostile", "faults", "channel_cut", "preauth_flood", "soak", "overload", "restart"
)  # fmt: skip
REPLICAS = 2
VARIANT = {
    "enabled": True,
    "replicas": REPLICAS,
    "num_cpus": 0.5,
    "max_batch_size": 8,
    "max_ongoing_requests": 16,  # per replica: 2 x max_batch_size, the settings' default
    "max_queued_requests": 128,  # absorbs the ~20 s without one replica at 20 req/s
    "health_check_period_s": 2,
    "health_check_timeout_s": 20,
}
OVERLOAD_QUEUE = 16
"""The variant's `max_queued_requests` during the overload phase: one replica's worth of
waiting requests, so any rate past capacity fills it within a second or two, on a fast machine
or a slow one. How fast a 503 comes back does not depend on how deep the queue is."""
OVERLOAD_FACTOR = 1.5  # offered load, as a multiple of what the replicas were measured to serve
FALLBACK_VARIANT = "student"


def default_variant(config: str) -> str:
    """The variant under test when `--variant` is not given: the profile's default variant.

    The catalogue's field for it is read when the profile has one; until then the profile's
    `student`, else its teacher."""
    from slimserve.catalogue import load_profile

    profile = load_profile(config)
    chosen = getattr(profile, "default_variant", None)
    if chosen:
        return chosen
    return FALLBACK_VARIANT if FALLBACK_VARIANT in profile.variants else profile.teacher


def _args(argv: list[str] | None) -> argparse.Namespace:
    quick = os.environ.get("RELIABILITY_QUICK", "") not in ("", "0")
    p = argparse.ArgumentParser(prog="reliability", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny.yaml", help="the profile (catalogue)")
    p.add_argument("--artifacts-dir", default=None, help="default: the profile's artifacts_dir")
    p.add_argument(
        "--variant", default=None, help="the variant under test (default: the profile's)"
    )
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
        default=None,
        help="overload req/s of 100-token requests (default: --overload-factor x the rate the "
        "replicas were just measured to sustain, so it overloads on any machine)",
    )
    p.add_argument(
        "--overload-factor",
        type=float,
        default=OVERLOAD_FACTOR,
        help="offered overload as a multiple of the measured sustainable rate",
    )
    p.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated subset of {','.join(PHASES)} (default: all)",
    )
    p.add_argument(
        "--skip-restart",
        action="store_true",
        help="leave out the restart phase (it needs Serve's fixed ports 8000, 8404, 9101, 8500)",
    )
    p.add_argument("--reports", default="reports", help="where reliability.{json,md} go")
    a = p.parse_args(argv)
    a.phases = [x.strip() for x in a.phases.split(",") if x.strip()]
    if unknown := set(a.phases) - set(PHASES):
        p.error(f"unknown phases: {', '.join(sorted(unknown))}")
    if a.skip_restart:
        a.phases = [x for x in a.phases if x != "restart"]
    a.soak_s = a.soak_s or (60.0 if a.quick else 600.0)
    a.fault_s = a.fault_s or (20.0 if a.quick else 60.0)
    a.fuzz_examples = (
        80  # per operation and mode; parameterless routes exhaust early (> 500 in all)
    )
    a.overload_s = 20.0 if a.quick else 30.0
    a.capacity_s = 5.0 if a.quick else 10.0  # the closed loop that measures what is sustained
    a.cut_s, a.cut_every_s = (10.0, 3.0) if a.quick else (20.0, 5.0)  # the channel cut's load
    # The pre-auth flood: connections, how many of them send, MiB each, seconds (per load).
    a.flood_connections, a.flood_senders = (50, 5) if a.quick else (200, 20)
    a.flood_mib, a.flood_s = 32.0, (10.0 if a.quick else 20.0)
    return a


def serve_env(path: Path = SERVE_CONFIG) -> dict[str, str]:
    """Ray Serve's request-path switches that `serve run serve_config.yaml` gives the controller
    (`controller_options.runtime_env.env_vars`), so this run measures the same request path."""
    import yaml

    config = yaml.safe_load(path.read_text()) or {}
    runtime_env = (config.get("controller_options") or {}).get("runtime_env") or {}
    return {k: str(v) for k, v in (runtime_env.get("env_vars") or {}).items()}


def _start_serve() -> str:
    """Ray + Serve on a free port of 127.0.0.1; the base URL."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.update(serve_env())  # before Ray starts: every Ray process inherits them
    # Node address 127.0.0.1: the ingress's events inbox listens there, so the pre-auth flood
    # only ever connects to a loopback address.
    ray.init(
        address="local",
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    port = free_port()
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=port, request_timeout_s=180))
    return f"http://127.0.0.1:{port}"


def _deploy(a: argparse.Namespace, variant: dict[str, Any]) -> None:
    """(Re)deploy the app: the variant under test with `variant`'s settings, no other."""
    from ray import serve

    from deployments.app import build_app

    args = {
        "config": a.config,
        "artifacts_dir": a.artifacts_dir,
        "defaults": {"enabled": False},
        "variants": {a.variant: variant},
        "ingress": {"request_timeout_s": 120},
    }
    serve.run(build_app(args), name=APP, route_prefix="/")


def _stop_serve() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    from deployments.app import plan

    a = _args(argv)
    a.variant = a.variant or default_variant(a.config)
    deployment = plan({"config": a.config, "artifacts_dir": a.artifacts_dir})
    card = next((p.card for p in deployment.variants if p.card.id == a.variant), None)
    if card is None or not card.deployed:
        print(f"{a.variant} cannot be served: {card.reason if card else 'not in the catalogue'}")
        return 2
    run = Run(a, deployment.profile, Path(deployment.machine["artifacts"]))
    run.notes.append(f"load average at start: {_load()} (2-core machine shared with other jobs)")
    run.notes.append(f"Serve switches from serve_config.yaml: {serve_env() or 'none'}")
    if "broken" in a.phases:
        _broken(run)
    if set(SERVED_PHASES) & set(a.phases):
        run.base = _start_serve()
        try:
            _deploy(a, VARIANT)
            for name, phase in SERVED_PHASES.items():
                if name in a.phases:
                    run.notes.append(f"load average before {name}: {_load()}")
                    phase(run)
        finally:
            _stop_serve()
    if "restart" in a.phases:
        run.notes.append(f"load average before restart: {_load()}")
        restart.phase(run)
    return _report(run)


def _broken(run: Run) -> None:
    """Damaged copies of the variant: the planner lists each unavailable, deploys the rest."""
    a = run.a
    with tempfile.TemporaryDirectory() as work:
        rows = broken.sweep(Path(a.config), run.profile, run.store.parent, Path(work), a.variant)
    run.table("Broken artifacts (planner)", rows)
    run.verdicts["broken artifacts all unavailable, others deploy"] = all(
        r["as_expected"] for r in rows
    )
    print(f"broken artifacts: {sum(r['as_expected'] for r in rows)}/{len(rows)} as expected")


def _faults(run: Run) -> None:
    """A replica lost under steady load, by ray.kill and by SIGKILL."""
    a, rows = run.a, []
    for mode in ("kill", "crash"):
        run.notes.append(f"load average before fault run ({mode}): {_load()}")
        row = faults.fault_run(
            run.base, APP, a.variant, mode, rate=a.rate, seconds=a.fault_s, body=run.body
        )
        rows.append(row)
        print("fault", mode, row)
    run.table("Replica faults under load", rows)
    lost = sum(r["plain_lost"] + r["stream_lost"] for r in rows)
    run.verdicts["faults: 0 lost"] = lost == 0
    run.verdicts["faults: 0 failed non-streamed"] = all(r["plain_failed"] == 0 for r in rows)
    run.verdicts["faults: 0 streams failed before their first frame"] = all(
        r["stream_failed"] == r["stream_failed_mid_stream"] for r in rows
    )


def _soak(run: Run) -> None:
    """Closed loop at the edge of capacity; replica memory must stay bounded."""
    a = run.a
    sk = soak.soak_run(
        run.base,
        APP,
        a.variant,
        run.body,
        concurrency=REPLICAS * VARIANT["max_ongoing_requests"],
        seconds=a.soak_s,
        warmup_s=10.0 if a.quick else 60.0,
    )
    run.table("Soak at the edge of capacity", [sk])
    print("soak", sk)
    run.verdicts["soak: RSS growth < 10 %"] = sk["max_rss_growth_pct"] < 10


def _overload(run: Run) -> None:
    """The variant redeployed with a short queue; first what it sustains is measured (closed
    loop, every admitted slot busy), then `overload_factor` times that is offered, open loop."""
    a = run.a
    variant = {**VARIANT, "max_queued_requests": OVERLOAD_QUEUE}
    _deploy(a, variant)
    body = {**run.body, "max_tokens": 100}
    slots = REPLICAS * variant["max_ongoing_requests"]
    sustained = overload.capacity(run.base, body, concurrency=slots, seconds=a.capacity_s)
    rate = a.overload_rate or max(1.0, a.overload_factor * sustained)
    over = overload.overload_run(run.base, body, rate, a.overload_s)
    row = {
        "sustained_rps": round(sustained, 1),
        "max_ongoing": f"{REPLICAS} x {variant['max_ongoing_requests']}",
        "max_queued": OVERLOAD_QUEUE,
        **over,
    }
    run.table("Overload (open loop past the measured capacity)", [row])
    run.notes.append(
        f"overload: {sustained:.1f} req/s sustained by {slots} closed-loop clients over "
        f"{a.capacity_s:g} s, then {rate:.1f} req/s offered for {a.overload_s:g} s; "
        "the probes (GET /healthz, a completion for an unknown model: a 404) cross the proxy "
        "and the ingress like a 503 does, without the variant's queue"
    )
    print("overload", row)
    run.verdicts["overload: the queue limit was reached (some 503s)"] = over["rejected_503"] > 0
    run.verdicts["overload: 503 p99 < 100 ms"] = (
        over["rejected_503"] > 0 and over["p99_503_ms"] < 100
    )
    run.verdicts["overload: every 503 has Retry-After"] = (
        over["with_retry_after"] == over["rejected_503"]
    )
    run.verdicts["overload: accepted requests finish"] = (
        over["accepted_failed"] == 0 and over["lost"] == 0
    )


def _report(run: Run) -> int:
    """Write reports/reliability.{json,md}; 1 when a target was missed."""
    from slimserve.reports import Table, new_report, write_report

    a = run.a
    targets = [{"target": k, "met": v} for k, v in run.verdicts.items()]
    tables = [Table.from_records("Targets", targets), *run.tables]
    run.notes.append(
        f"load average at end: {_load()}; wall time {time.monotonic() - run.t_start:.0f} s"
    )
    run.notes.append(
        f"mode: {'quick' if a.quick else 'full'}; phases {','.join(a.phases)}; "
        f"soak {a.soak_s:g} s; faults {a.rate:g} req/s for {a.fault_s:g} s each; "
        f"channel cut every {a.cut_every_s:g} s at {a.rate:g} req/s for {a.cut_s:g} s; "
        "pre-auth flood "
        f"{a.flood_connections} connections ({a.flood_senders} x {a.flood_mib:g} MiB) for "
        f"{a.flood_s:g} s; variant {a.variant} x {REPLICAS} replicas"
    )
    report = new_report(
        "reliability",
        kind="reliability",
        title=f"Reliability: faults, overload, soak, hostile input, restart ({run.profile})",
        tables=tables,
        notes=run.notes,
    )
    paths = write_report(report, a.reports, png=False)
    print("wrote", ", ".join(map(str, paths)))
    missed = [k for k, v in run.verdicts.items() if not v]
    for k in missed:
        print("MISSED:", k)
    return 1 if missed else 0


SERVED_PHASES = {
    "hostile": hostile.phase,
    "faults": _faults,
    "channel_cut": channel_cut.phase,
    "preauth_flood": preauth.phase,
    "soak": _soak,
    "overload": _overload,
}


if __name__ == "__main__":
    raise SystemExit(main())
