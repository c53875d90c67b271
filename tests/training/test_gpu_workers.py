"""GPU training workers reserve what is free or fail clearly (never wait for Serve's GPUs).

Ray's resource calls are replaced here; tests/gpu_sim runs the same rules against a Ray with
a logical GPU and real Serve replicas holding shares of it.
"""

from __future__ import annotations

import pytest
import ray

from slimserve.catalogue import TrainingDefaults
from training import trainer
from training.trainer import plan_workers, scaling_config


@pytest.fixture
def cluster(monkeypatch):
    """Set the cluster's (total, free) CPUs and GPUs; the trial reservation succeeds."""
    probes: list = []
    monkeypatch.setattr(trainer, "gpus_fit", lambda n, share: probes.append((n, share)) or True)

    def set_resources(cpus: float, gpus: float, free_gpus: float) -> list:
        monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": cpus, "GPU": gpus})
        monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": cpus, "GPU": free_gpus})
        return probes

    return set_resources


def test_a_free_gpu_is_reserved_whole(cluster):
    probes = cluster(2, 1, 1.0)
    plan = plan_workers(TrainingDefaults(workers=1, use_gpu="auto"))
    assert plan.use_gpu and plan.gpus_per_worker == 1.0 and plan.device == "cuda"
    assert scaling_config(plan).resources_per_worker == {"CPU": 2, "GPU": 1.0}
    assert probes == [(1, 1.0)]


def test_gpus_held_by_serve_give_a_share_or_a_clear_error(cluster):
    cluster(2, 1, 0.5)  # Serve replicas hold half the GPU
    plan = plan_workers(TrainingDefaults(workers=1, use_gpu=True))
    assert plan.gpus_per_worker == 0.5
    cluster(2, 1, 0.01)  # auto shares: nine replicas hold 0.99
    with pytest.raises(RuntimeError, match=r"0\.01 of 1 GPUs free for 1 training worker"):
        plan_workers(TrainingDefaults(workers=1, use_gpu="auto"))
    with pytest.raises(RuntimeError, match="Serve replicas"):
        plan_workers(TrainingDefaults(workers=1, use_gpu=True, cpus_per_worker=1))


def test_split_free_capacity_fails_instead_of_waiting(cluster, monkeypatch):
    cluster(2, 2, 0.8)  # 0.4 free on each of two GPUs: no 0.8 of one GPU anywhere
    monkeypatch.setattr(trainer, "gpus_fit", lambda n, share: False)
    with pytest.raises(RuntimeError, match="split across GPUs"):
        plan_workers(TrainingDefaults(workers=1, use_gpu=True))


def test_auto_follows_the_ray_cluster_not_this_process(cluster, monkeypatch):
    from slimserve import hardware

    monkeypatch.setattr(hardware, "has_cuda", lambda: True)  # a GPU here, none in the cluster
    cluster(2, 0, 0.0)
    plan = plan_workers(TrainingDefaults(workers=1, use_gpu="auto"))
    assert not plan.use_gpu and plan.gpus_per_worker == 0.0
    assert scaling_config(plan).resources_per_worker == {"CPU": 2}
