"""The local channel between a ClientApp relay and its node worker (client/worker.py).

Flower runs every message in a fresh `flwr-clientapp` process, so nothing a ClientApp
keeps survives to the next message. The node worker is a long-lived process on the data
owner's machine that keeps the resident model; the ClientApp only relays the message to it
over a Unix socket that only its user can open (the socket's folder is mode 0700).

One exchange per connection, each part a frame (8-byte big-endian length, then bytes):

    relay -> worker   header {"protocol": N, "timeout": s}, Flower's Message proto,
                      Flower's Context proto (node config, run config, node state)
    worker -> relay   header {"protocol": N, "ok": bool, "error": str}, then, if ok,
                      the reply Message proto and the node state (a RecordDict proto)

Both sides refuse another `PROTOCOL` with a message that says which side is older. The
encoding is Flower's own protobuf serde: no pickle on a path that receives data. Only the
standard library and Flower are imported here, so the relay's import path stays light.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.common import serde
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

PROTOCOL = 1  # bump on any change to the frames below
WORKER_SOCKET = "worker-socket"  # node config key: where the node worker listens
CACHE_DIR = "cache-dir"  # node config key: the node's link cache and master files
NODE_COMMAND = "python -m client.node"  # what starts a worker with its SuperNode(s)
_LENGTH = struct.Struct(">Q")
_MAX_FRAME = 1 << 36  # 64 GiB: a corrupt length fails here, not in a huge allocation


class WorkerError(RuntimeError):
    """The worker could not serve the message (protocol mismatch, failure, timeout)."""


def socket_dir() -> Path:
    """The default folder of worker sockets, this user's own: only they can enter it (0700)."""
    folder = Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / f"seedlora-{os.getuid()}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    return folder


def send_frame(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_LENGTH.pack(len(data)) + data)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 22))
        if not chunk:
            raise ConnectionError("the peer closed the connection mid-frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> bytes:
    (length,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size))
    if length > _MAX_FRAME:
        raise ConnectionError(f"frame of {length} bytes: not a seedlora worker peer")
    return _recv_exactly(sock, length)


def _header(frame: bytes, side: str) -> dict:
    """The decoded header of a frame from the other side; WorkerError unless it speaks
    this `PROTOCOL` (`side` names this side in the message)."""
    try:
        header = json.loads(frame)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WorkerError(f"not a seedlora worker frame: {err}") from err
    if not isinstance(header, dict) or header.get("protocol") != PROTOCOL:
        theirs = header.get("protocol") if isinstance(header, dict) else None
        raise WorkerError(
            f"worker protocol mismatch: the {side} speaks version {PROTOCOL}, its peer "
            f"{theirs}; the run's app (the relay) and the data owner's installed project "
            f"(the worker) must be the same release: upgrade one, then restart `{NODE_COMMAND}`"
        )
    return header


# --- the relay's side ---------------------------------------------------------------------
def exchange(
    path: str, msg: Message, context: Context, timeout: float
) -> tuple[Message, RecordDict]:
    """Send `msg` and `context` to the worker at `path`; its reply and the new node state.

    Raises WorkerError when no worker listens there, when it speaks another protocol,
    fails, or does not answer within `timeout` seconds."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except OSError as err:
            raise WorkerError(
                f"no node worker at {path} ({err.strerror or err}): start the data owner's "
                f"node with `{NODE_COMMAND}`, which runs the worker beside the SuperNode"
            ) from err
        send_frame(sock, json.dumps({"protocol": PROTOCOL, "timeout": timeout}).encode())
        send_frame(sock, serde.message_to_proto(msg).SerializeToString())
        send_frame(sock, serde.context_to_proto(context).SerializeToString())
        header = _header(recv_frame(sock), "relay")
        if not header.get("ok"):
            raise WorkerError(f"node worker failed: {header.get('error', 'no reason given')}")
        reply = ProtoMessage.FromString(recv_frame(sock))
        state = ProtoRecordDict.FromString(recv_frame(sock))
        return serde.message_from_proto(reply), serde.recorddict_from_proto(state)
    except TimeoutError as err:
        raise WorkerError(f"node worker at {path} gave no reply within {timeout:.0f} s") from err
    except ConnectionError as err:
        raise WorkerError(f"node worker at {path} went away mid-message ({err})") from err
    finally:
        sock.close()


# --- the worker's side --------------------------------------------------------------------
def read_request(sock: socket.socket) -> tuple[Message, Context, float]:
    """The relayed message, its context and the relay's timeout (WorkerError if foreign)."""
    frames = [recv_frame(sock) for _ in range(3)]  # all of them, so a refusal is read
    header = _header(frames[0], "worker")
    msg = serde.message_from_proto(ProtoMessage.FromString(frames[1]))
    context = serde.context_from_proto(ProtoContext.FromString(frames[2]))
    return msg, context, float(header.get("timeout", 0.0))


def write_reply(sock: socket.socket, reply: Message, state: RecordDict) -> None:
    send_frame(sock, json.dumps({"protocol": PROTOCOL, "ok": True}).encode())
    send_frame(sock, serde.message_to_proto(reply).SerializeToString())
    send_frame(sock, serde.recorddict_to_proto(state).SerializeToString())


def write_error(sock: socket.socket, error: str) -> None:
    send_frame(sock, json.dumps({"protocol": PROTOCOL, "ok": False, "error": error}).encode())
