"""The test session is offline from its first import: the Hugging Face libraries were
imported in offline mode, and a connection beyond this machine is refused at once while
loopback ones work (tests/conftest.py, tests/network.py)."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from tests.network import OutsideNetworkError, is_local

OUTSIDE = ("203.0.113.7", 443)  # TEST-NET-3 (RFC 5737): never this machine


def test_the_hugging_face_libraries_were_imported_offline():
    import huggingface_hub.constants
    import transformers.utils.hub

    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        assert os.environ[key] == "1", key
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # read once, when it was imported
    assert transformers.utils.hub.is_offline_mode()


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM])
def test_a_connection_beyond_this_machine_is_refused(kind):
    with socket.socket(socket.AF_INET, kind) as sock:
        with pytest.raises(OutsideNetworkError, match=r"203\.0\.113\.7"):
            sock.connect(OUTSIDE)
        with pytest.raises(OutsideNetworkError):
            sock.connect_ex(OUTSIDE)
    with pytest.raises(OutsideNetworkError, match="huggingface.co"):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    with pytest.raises(OutsideNetworkError):
        socket.getaddrinfo("example.org", 80)


def _echo_once(server: socket.socket) -> None:
    conn, _ = server.accept()
    with conn:
        conn.sendall(conn.recv(16))


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_a_loopback_connection_works(family, host):
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    with socket.socket(family, socket.SOCK_STREAM) as server:
        try:
            server.bind((host, 0))
        except OSError:
            pytest.skip(f"{host} is not configured here")
        server.listen(1)
        echo = threading.Thread(target=_echo_once, args=(server,))
        echo.start()
        with socket.create_connection(server.getsockname()[:2], timeout=10) as client:
            client.sendall(b"ping")
            assert client.recv(16) == b"ping"
        echo.join(10)
    assert is_local("localhost") and is_local("127.0.0.2") and not is_local("10.0.0.1")
