"""`make bench`: every benchmark in one run, on one machine, written to reports/.

1. variants — `bench/variants.py`, every built variant -> `reports/bench_variants.*`;
2. baseline — the older architecture (`bench/baseline.py`: Flask, 2 torch threads, HF
   `generate` per request) serving the student, driven by the load generator;
3. serving — `serve_config.yaml` as `serve run` applies it (on a private local Ray and a free
   port), the same load generator, the same student weights, the same requests;
4. gpu — `bench/gpu_decode.py` (skipped with its reason without CUDA).

Steps 2 and 3 take turns level by level (`bench.serving.run_levels`): both servers are up, and
only one is under load at any time, so neither competes with the other for the cores, and a
drift in the machine's other load hits both sides of every ratio alike. The race, the ratios and the
targets go to `reports/bench_serving.*`; `reports/bench_results.md` is the README's
results section, generated from the same numbers. Every report is stamped with the machine
(CPU, cores, GPU, the load average at the start and end), versions, torch threads and commit.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.race import serving_report
from bench.serving import CpuMeter, run_levels
from slimserve.net import free_port, machine_lock, port_from

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PARTS = {  # `slimserve bench <what>` -> the parts of `make bench` it runs
    "variants": ("variants",),
    "serving": ("serving",),
    "baseline": ("baseline",),
    "race": ("baseline", "serving"),
    "gpu": ("gpu",),
    "all": ("variants", "baseline", "serving", "gpu"),
}


@dataclass
class BenchPlan:
    """What one `make bench` run measures (defaults: the issue's figures on the tiny profile)."""

    config: str = "configs/tiny.yaml"
    serve_config: str = "serve_config.yaml"
    artifacts: str | None = None  # None = the profile's artifacts_dir
    variant: str | None = None  # served by both sides of the race (None: the profile's default)
    reports_dir: str = "reports"
    parts: Sequence[str] = ("variants", "baseline", "serving", "gpu")
    concurrencies: Sequence[int] = (1, 4, 16, 32)
    max_tokens: int = 64
    requests_per_client: int = 4  # per level: max(min_requests, this x concurrency)
    min_requests: int = 16
    repeats: int = 5  # variants: timed runs per figure
    variant_threads: int = 1
    baseline_threads: int = 2
    command: str | None = None
    loads: list[str] = field(default_factory=list)  # load averages, as measured

    def resolve_variant(self, profile: Any) -> str:
        """`variant`, or the profile's default variant when none was named."""
        self.variant = self.variant or profile.default_variant
        return self.variant

    def open_store(self) -> tuple[Any, Any]:
        """The profile and its ArtifactStore (`artifacts`, when set, overrides the profile's
        folder); `variant` is resolved on the way."""
        from slimserve.artifacts import ArtifactStore
        from slimserve.catalogue import load_profile

        profile = load_profile(self.config)
        root = Path(self.artifacts) if self.artifacts else profile.artifacts_root()
        self.resolve_variant(profile)
        return profile, ArtifactStore(root, profile.name)

    def load(self, when: str) -> str:
        one, five, fifteen = os.getloadavg()
        line = f"{when}: {one:.2f}, {five:.2f}, {fifteen:.2f}"
        self.loads.append(line)
        print(f"load average {line}", flush=True)
        return line


def _models_deployed(url: str) -> list[str]:
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as r:
            cards = json.loads(r.read())["data"]
    except (OSError, ValueError, KeyError):
        return []
    return [c["id"] for c in cards if c.get("deployed")]


SERVE_PRIVATE_API = "ray.serve._private.api"


def deploy_config(schema: Any) -> None:
    """Start Serve and apply a whole `ServeDeploySchema`, the way `serve run config.yaml` does.

    Ray's public API deploys one application object (`serve.run`); it cannot apply a config
    file's `deployments:` overrides and `controller_options` in-process. `serve run` itself
    does it with the private controller client, so this function is the one place the
    benchmarks reach into `ray.serve._private` (tests/bench/test_serve_private.py fails when
    Ray moves it).
    """
    from importlib import import_module

    serve_api = import_module(SERVE_PRIVATE_API)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        # The request-path settings (environment of the proxy and every replica) live in
        # the YAML's controller_options, as `serve run` applies them.
        controller_options=schema.controller_options,
    )
    client.deploy_apps(schema)


START_LOCK = "slimserve-serve-start"
"""The machine-wide lock `start_serve` holds from choosing its ports until Serve has bound them."""

SIDE_PORTS = {
    "RAY_SERVE_HAPROXY_METRICS_PORT": 9101,
    "RAY_SERVE_HAPROXY_STATS_PORT": 8404,
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": 8500,
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": 9500,
}
"""Fixed ports Serve binds besides the HTTP port (HAProxy's Prometheus and stats pages, the
fallback Python proxy), with Ray's defaults: `start_serve` moves each one the YAML leaves unset
to the first free port from its default up, so a benchmark or a test can run next to a
`serve run` on the same machine (and keeps the defaults when nothing else holds them)."""


def local_config(
    serve_config: str | Path,
    port: int,
    *,
    config: str | Path | None = None,
    artifacts_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The YAML of `serve_config` as `start_serve` applies it: HTTP on 127.0.0.1:`port`, every
    side port (SIDE_PORTS) the YAML leaves unset on the first free one from its default, and
    `config` / `artifacts_dir` (when given) as the application's args, resolved."""
    import yaml

    raw = yaml.safe_load(Path(serve_config).read_text())
    raw.setdefault("http_options", {}).update(host="127.0.0.1", port=port)
    runtime_env = raw.setdefault("controller_options", {}).setdefault("runtime_env", {})
    env = runtime_env.setdefault("env_vars", {})
    for name, default in SIDE_PORTS.items():  # a `serve run` up here holds the defaults
        env.setdefault(name, str(port_from(default)))
    args = raw["applications"][0].setdefault("args", {})
    if config is not None:
        args["config"] = str(Path(config).resolve())
    if artifacts_dir is not None:
        args["artifacts_dir"] = str(Path(artifacts_dir).resolve())
    return raw


@contextlib.contextmanager
def start_serve(
    serve_config: str | Path,
    *,
    config: str | Path | None = None,
    artifacts_dir: str | Path | None = None,
    port: int | None = None,
    need: Sequence[str] | None = None,
    timeout_s: float = 900.0,
) -> Iterator[str]:
    """`serve run serve_config.yaml` in this process, on its own local Ray and a free port.

    The YAML is applied the way `serve run` applies it (the controller runs the application
    builder with the file's `args` and applies its `deployments:` overrides), with only the ports
    changed (the HTTP port and SIDE_PORTS), and `config` / `artifacts_dir` overriding the args
    when given. A private Ray (`address="local"`) keeps it apart from any other Ray on the
    machine; it is shut down after (a Ray this process had already started is used instead,
    and left running).
    Yields the base URL once every variant in `need` (default: the profile's default variant)
    is deployed and the app is RUNNING.
    """
    import ray
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    # Ports are chosen free, then bound when Serve starts: two starts at once take turns
    # (the lock is released once the app serves, or on any error).
    with contextlib.ExitStack() as starting:
        starting.enter_context(machine_lock(START_LOCK))
        port = port or free_port()
        raw = local_config(serve_config, port, config=config, artifacts_dir=artifacts_dir)
        args = raw["applications"][0]["args"]
        if need is None:
            from slimserve.catalogue import load_profile
            from slimserve.cli import DEFAULT_CONFIG

            need = (load_profile(args.get("config", DEFAULT_CONFIG)).default_variant,)
        schema = ServeDeploySchema.model_validate(raw)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Ray starts its workers (replicas, proxy) at niceness 15, so any other busy process on
        # the machine outranks them; the baseline runs at 0. Same priority for a fair race.
        os.environ.setdefault("RAY_worker_niceness", "0")
        owns_ray = not ray.is_initialized()  # a test session's Ray is reused, and left running
        if owns_ray:
            ray.init(
                address="local",
                namespace="serve",
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            deploy_config(schema)
            deadline = time.monotonic() + timeout_s
            name = schema.applications[0].name
            while True:
                status = serve.status().applications.get(name)
                if status is not None and status.status == "DEPLOY_FAILED":
                    raise RuntimeError(f"Serve application failed: {status.message}")
                running = status is not None and status.status == "RUNNING"
                if running and set(need) <= set(_models_deployed(url)):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{need} not serving after {timeout_s:.0f}s")
                time.sleep(0.5)
            starting.close()  # every port is bound now
            yield url
        finally:
            with contextlib.suppress(Exception):
                serve.shutdown()
            if owns_ray:
                ray.shutdown()


def _race(plan: BenchPlan, folder: Path, root: Path, out: Path) -> dict[str, list[Any]]:
    """Both servers up at once (each idle while the other is measured), taking turns per level.

    The baseline process is idle between its levels (Flask waiting on a socket); Ray's
    background work (controller, raylet, health checks) goes on during the baseline's levels,
    and the CPU table shows how much.
    """
    from bench.baseline import start_baseline

    servers: dict[str, str] = {}
    extra: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        if "serving" in plan.parts:
            servers["slimserve"] = stack.enter_context(
                start_serve(
                    plan.serve_config, config=plan.config, artifacts_dir=root, need=(plan.variant,)
                )
            )
        if "baseline" in plan.parts:
            log = out / "raw" / "baseline.log"  # reports/raw/ is not committed
            log.parent.mkdir(parents=True, exist_ok=True)
            server = stack.enter_context(
                start_baseline(folder, threads=plan.baseline_threads, log=log)
            )
            servers["baseline"], extra["baseline"] = server.url, server.pid
        plan.load("servers up")
        levels = run_levels(
            servers,
            model=plan.variant,
            concurrencies=plan.concurrencies,
            requests_per_client=plan.requests_per_client,
            min_requests=plan.min_requests,
            max_tokens=plan.max_tokens,
            meter=CpuMeter(extra),
            own={"baseline": frozenset({"baseline"})},
        )
        plan.load("after the race")
    return levels


def _serve_threads(plan: BenchPlan) -> str:
    """The served variant's replica torch threads, as serve_config.yaml decides them."""
    import yaml

    from deployments.settings import parse_args, resolve
    from slimserve.catalogue import load_profile

    if plan.variant is None:
        plan.resolve_variant(load_profile(plan.config))
    args = yaml.safe_load(Path(plan.serve_config).read_text())["applications"][0]["args"]
    settings = parse_args(args)
    s = resolve(settings, list(settings.variants) or [plan.variant]).get(plan.variant)
    if s is None:
        return "?"
    return f"{s.torch_threads} per replica x {s.replicas or 1} replica(s)"


def run_all(plan: BenchPlan) -> list[Path]:
    """Run the parts of `plan` in order; write their reports; return the paths written."""
    from slimserve.hardware import machine
    from slimserve.reports import write_report

    profile, store = plan.open_store()
    if {"baseline", "serving"} & set(plan.parts) and store.manifest(plan.variant) is None:
        raise FileNotFoundError(f"{plan.variant} is not built: run `make artifacts`")
    out = Path(plan.reports_dir)
    written: list[Path] = []
    threads = {
        "variants": f"{plan.variant_threads}",
        "baseline": f"{plan.baseline_threads}",
        "serving": _serve_threads(plan),
    }

    def stamp() -> dict[str, Any]:
        loads = " | ".join(plan.loads)
        torch_threads = "; ".join(f"{k} {v}" for k, v in threads.items())
        return {**machine(), "load_average": loads, "torch_threads": torch_threads}

    plan.load("start")
    if "variants" in plan.parts:
        from bench.variants import run_variants, variants_report

        rows = run_variants(profile, store, threads=plan.variant_threads, repeats=plan.repeats)
        plan.load("after variants")
        report = variants_report(rows, repeats=plan.repeats, command=plan.command)
        report.machine = stamp()
        written += write_report(report, out)
    race = [p for p in ("baseline", "serving") if p in plan.parts]
    levels: dict[str, list[Any]] = {}
    if race:
        levels = _race(plan, store.path(plan.variant), store.root, out)
    slim, baseline = levels.get("slimserve", []), levels.get("baseline", [])
    if slim or baseline:
        report = serving_report(slim, baseline, plan.max_tokens, command=plan.command)
        report.machine = stamp()
        written += write_report(report, out)
    if "gpu" in plan.parts:
        from bench.gpu_decode import gpu_report, run_gpu_decode

        report = gpu_report(run_gpu_decode(), command=plan.command)
        report.machine = stamp()
        written += write_report(report, out)
    results = out / "bench_results.md"
    results.write_text(results_markdown(out))
    written.append(results)
    for path in written:
        print(f"wrote {path}")
    return written


RESULTS_ORDER = ("bench_serving", "bench_peers", "bench_variants", "bench_gpu_decode")


def results_markdown(reports_dir: str | Path, command: str = "make bench") -> str:
    """The README's results section, rebuilt from the reports this run wrote."""
    from slimserve.reports import read_report, render_markdown

    parts = ["## Results", "", f"Reproduce: `{command}` (writes `reports/`).", ""]
    for name in RESULTS_ORDER:
        path = Path(reports_dir) / f"{name}.json"
        if not path.is_file():
            continue
        loaded = read_report(path)
        if loaded.report is None:
            continue
        png = f"{name}.png" if (Path(reports_dir) / f"{name}.png").is_file() else None
        body = "\n" + render_markdown(loaded.report, f"reports/{png}" if png else None)
        parts.append(body.replace("\n## ", "\n#### ").replace("\n# ", "\n### "))
    return "\n".join(parts)
