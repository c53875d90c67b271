"""`free_port` hands out a port that can be bound at once; `machine_lock` makes holders take turns."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid

from slimserve.net import free_port, machine_lock


def test_free_port_can_be_bound():
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_machine_lock_makes_another_process_wait():
    name = f"slimserve-test-{uuid.uuid4().hex}"
    other = [
        sys.executable,
        "-c",
        f"from slimserve.net import machine_lock\nwith machine_lock({name!r}): print('got it')",
    ]
    with machine_lock(name):
        waiting = subprocess.Popen(other, stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert waiting.poll() is None  # blocked while this process holds the lock
    out, _ = waiting.communicate(timeout=30)
    assert waiting.returncode == 0 and out.strip() == "got it"
