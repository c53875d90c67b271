"""A simulated GPU cluster: Ray started with logical GPUs on a machine without one.

Ray schedules `num_gpus` for real with `ray.init(num_gpus=N)` (or `Cluster.add_node(num_gpus=1)`)
whether or not CUDA exists; only CUDA itself is absent, so replicas that must answer load with
`device: cpu` while holding their GPU share.

These fixtures stop the session's shared Ray (tests/conftest.py) if it runs, start their own,
always stop Serve and that Ray afterwards (also when a test fails or times out), and restart
the shared Ray with its original arguments, so the folders that run later find it as before.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

os.environ.setdefault("SLIMSERVE_TRAIN_GPU_WAIT_S", "3")  # the GPU check's trial reservation


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "gpu_sim: a Ray cluster with logical GPUs (no CUDA needed; part of make test)"
    )


def _stop() -> None:
    import ray

    if ray.is_initialized():
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@contextmanager
def own_ray(shared_args: dict[str, Any], start, cleanup=None) -> Iterator[Any]:
    """Run `start()` (it starts Ray) with the shared Ray stopped; afterwards stop Serve and
    that Ray, run `cleanup()` (e.g. a cluster's nodes), then restart the shared Ray."""
    import ray

    was_running = ray.is_initialized()
    _stop()
    try:
        yield start()
    finally:
        try:
            _stop()
        finally:
            if cleanup is not None:
                cleanup()
            if was_running:
                ray.init(**shared_args)


@pytest.fixture(scope="module")
def one_gpu_ray(shared_ray_args) -> Iterator[Any]:
    """A local Ray with 2 CPUs and 1 logical GPU."""
    import ray

    with own_ray(shared_ray_args, lambda: ray.init(**{**shared_ray_args, "num_gpus": 1})):
        yield ray


@pytest.fixture(scope="module")
def two_gpu_nodes(shared_ray_args) -> Iterator[Any]:
    """Two Ray nodes on this machine, 1 CPU and 1 logical GPU each (`ray.cluster_utils`)."""
    import ray
    from ray.cluster_utils import Cluster

    nodes: list[Cluster] = []

    def start():
        head = {"num_cpus": 1, "num_gpus": 1, "include_dashboard": False}
        nodes.append(Cluster(initialize_head=True, head_node_args=head))
        nodes[0].add_node(num_cpus=1, num_gpus=1)
        nodes[0].wait_for_nodes()
        return ray.init(address=nodes[0].address, log_to_driver=False, configure_logging=False)

    with own_ray(shared_ray_args, start, lambda: [c.shutdown() for c in nodes]):
        yield ray
