"""Serve starts once for the deployments tests, on tiny artifacts built here in code.

`serve_urls` builds a tiny profile (random 2-layer, 32-wide GPT-2s with a ~300-token BPE) and
runs four applications in one Serve instance on a free port:

* `main` at `/`: teacher, student, student-b, student-c (torch), plus catalogue entries that
  are not deployed (a TensorRT manifest on a CPU machine, a corrupt manifest, one not built);
* `faults` at `/faults`: one copy of the student with tiny limits (batch 1, 2 in flight, queue
  1, a 3 s request timeout, 1 s health checks), so the fault tests never disturb `main`;
* `empty` at `/empty`: an empty artifacts folder (the documented "not built" answers);
* `secured` at `/secured`: like `empty`, with an API key (`SLIMSERVE_TEST_API_KEY`, set before
  Ray starts so every worker inherits it).

Serve's replicas hold CPUs, so Serve must stop when this folder's tests end, before other
folders (Ray Train) need the cores. `scope="package"` alone does not do that: this folder has no
`__init__.py`, so pytest keeps the fixture to the end of the session (the training tests then
waited forever for a CPU). `pytest_runtest_teardown` below stops Serve after this folder's last
test; the fixture's own finalizer is then a no-op.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from serve_helpers import API_KEY_ENV, PROFILE, ServeUrls, build_tiny_store

from slimserve.net import free_port


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop Serve once the next test lies outside this folder (or there is none)."""
    here = Path(__file__).parent
    if nextitem is None or here not in Path(nextitem.path).parents:
        import ray

        if ray.is_initialized():
            from ray import serve

            serve.shutdown()


def _args(profile_path: Path, root: Path, **extra: Any) -> dict[str, Any]:
    return {"config": str(profile_path), "artifacts_dir": str(root), **extra}


@pytest.fixture(scope="package")
def serve_urls(ray_session, tmp_path_factory) -> Iterator[ServeUrls]:
    from ray import serve
    from ray.serve.config import HTTPOptions

    from deployments.app import build_app

    base = tmp_path_factory.mktemp("serve")
    profile_path = base / "deploytest.yaml"
    profile_path.write_text(yaml.safe_dump(PROFILE, sort_keys=False))
    main_root, faults_root, empty_root = base / "main", base / "faults", base / "empty"
    build_tiny_store(main_root, profile_path)
    shutil.copytree(main_root / "deploytest" / "student", faults_root / "deploytest" / "student")
    empty_root.mkdir()

    port = free_port()
    serve.start(
        http_options=HTTPOptions(host="127.0.0.1", port=port, request_timeout_s=60),
    )
    # One SSE frame per token (the framing tests count them); production merges 20 ms.
    light = {"num_cpus": 0.15, "max_batch_size": 4, "stream_min_interval_ms": 0}
    faults = {
        "num_cpus": 0.15,
        "max_batch_size": 1,
        "max_ongoing_requests": 2,
        "max_queued_requests": 1,
        "retry_after_s": 2,
        "health_check_period_s": 1,
        "health_check_timeout_s": 10,
    }
    faults_args = _args(
        profile_path, faults_root, defaults=faults, ingress={"request_timeout_s": 3}
    )
    apps = {
        "main": build_app(_args(profile_path, main_root, defaults=light)),
        "faults": build_app(faults_args),
        "empty": build_app(_args(profile_path, empty_root)),
        "secured": build_app(_args(profile_path, empty_root, ingress={"api_key_env": API_KEY_ENV})),
    }
    t0 = time.monotonic()
    serve.run_many(
        [
            serve.RunTarget(
                target=app, name=name, route_prefix="/" if name == "main" else f"/{name}"
            )
            for name, app in apps.items()
        ]
    )
    print(f"serve: 4 applications running in {time.monotonic() - t0:.1f}s")
    root = f"http://127.0.0.1:{port}"
    try:
        yield ServeUrls(
            main=root,
            faults=f"{root}/faults",
            empty=f"{root}/empty",
            secured=f"{root}/secured",
            store=main_root / "deploytest",
            faults_store=faults_root / "deploytest",
            profile_path=profile_path,
        )
    finally:
        serve.shutdown()
