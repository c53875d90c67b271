"""Shared fixtures: Ray starts at most once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The shared Ray's arguments; tests/gpu_sim stops it, runs its own Ray with logical GPUs and
# restarts it with these (`shared_ray_args`), so the folders after it find it as it was.
SHARED_RAY = {
    "address": "local",
    "num_cpus": 2,
    "num_gpus": 0,
    "include_dashboard": False,
    "log_to_driver": False,
    "configure_logging": False,
    # Metrics reach Ray's Prometheus endpoint every 2 s instead of 10 s, so a test waiting for
    # an exported value waits less.
    "_system_config": {"metrics_report_interval_ms": 2000},
}


@pytest.fixture(scope="session")
def shared_ray_args() -> dict:
    return dict(SHARED_RAY)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray shared by every test that needs it; shut down at the end of the run.

    CPU-only on every machine (`num_gpus=0`): the tests that use it check CPU placement and
    CPU training, which a GPU found by Ray's autodetection would change; tests/gpu_sim starts
    its own Ray with logical GPUs.
    """
    import ray

    if not ray.is_initialized():
        ray.init(**SHARED_RAY)
    yield ray
    ray.shutdown()
