"""No network during tests: connections are refused unless they stay on this machine.

Python-level sockets only (urllib, requests, httpx, huggingface_hub, asyncio): a connect
or a name lookup that would leave the machine raises `OutsideNetworkError` at once, naming
the address, instead of waiting on a network that CI may not have. Unix sockets, the
loopback addresses (127.0.0.0/8, ::1, `localhost`) and this machine's own name pass. Child
processes do not inherit this guard; they inherit the `*_OFFLINE` environment that
tests/conftest.py sets."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest

LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", ""})


class OutsideNetworkError(ConnectionRefusedError):
    """A test tried to reach beyond this machine."""


def is_local(host: Any) -> bool:
    """True for a loopback IP literal, `localhost` or this machine's own name."""
    if host is None:
        return True
    text = host.decode() if isinstance(host, bytes) else str(host)
    try:
        return ipaddress.ip_address(text.split("%")[0]).is_loopback
    except ValueError:
        return text.lower() in LOCAL_NAMES or text == socket.gethostname()


def _checked(family: int, address: Any) -> None:
    if family in (socket.AF_INET, socket.AF_INET6) and not is_local(address[0]):
        raise OutsideNetworkError(f"tests run offline: connect to {address!r} refused")


def refuse_outside_network() -> pytest.MonkeyPatch:
    """From now on, connects and lookups of hosts beyond this machine raise; `.undo()` on
    the returned patch lets them through again."""
    connect, connect_ex, getaddrinfo = (
        socket.socket.connect,
        socket.socket.connect_ex,
        socket.getaddrinfo,
    )

    def guarded_connect(self: socket.socket, address: Any) -> None:
        _checked(self.family, address)
        return connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: Any) -> int:
        _checked(self.family, address)
        return connect_ex(self, address)

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> list:
        if not is_local(host):
            raise OutsideNetworkError(f"tests run offline: lookup of {host!r} refused")
        return getaddrinfo(host, *args, **kwargs)

    patch = pytest.MonkeyPatch()
    patch.setattr(socket.socket, "connect", guarded_connect)
    patch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    patch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    return patch
