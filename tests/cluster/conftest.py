"""The `cluster` marker: multi-node scenarios that start their own Ray cluster in a subprocess.

Registered here as well as in pyproject.toml so `--strict-markers` accepts it either way.
Select them alone with `make test-cluster` (`pytest -m cluster tests/cluster`).
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cluster: starts a multi-node Ray cluster of its own (make test-cluster)"
    )
