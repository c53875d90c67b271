"""`free_port` hands out a port that can be bound at once."""

from __future__ import annotations

import socket

from slimserve.net import free_port


def test_free_port_can_be_bound():
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
