"""A model replica lowers its own CPU priority below the proxy's and the ingress's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECK = (
    "import os; from deployments.model import lower_priority; "
    "before = os.nice(0); after = lower_priority(); print(before, after)"
)


def niceness(env_value: str | None) -> tuple[int, int]:
    env = {k: v for k, v in os.environ.items() if k != "SLIMSERVE_REPLICA_NICENESS"}
    if env_value is not None:
        env["SLIMSERVE_REPLICA_NICENESS"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    before, after = out.stdout.split()
    return int(before), int(after)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("value", "step"), [(None, 10), ("3", 3), ("0", 0), ("-4", 0), ("oops", 10)]
)
def test_replica_niceness_is_an_increment(value, step):
    before, after = niceness(value)
    assert after == min(19, before + step)
