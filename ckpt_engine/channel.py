"""ZMQ plumbing shared by both sides: socket addresses, framed send/receive with deadlines,
and peer tracking through the socket monitor (so a dead peer is noticed at once, not only when
a timeout expires).

Addresses are ``ipc://<dir>/ckpt-engine-<run id>-XXXX/<name>-<token>.sock``: the directory is
created with mode 0700, so only this user can connect, and the token is random (128 bits). With
CKPT_ENGINE_SOCKET_DIR=@ they are Linux abstract names (``ipc://@ckpt-engine-<run id>-<name>-
<token>``) instead, reachable across mount namespaces but listed in /proc/net/unix to anyone on
the host; the PS then refuses a second peer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import stat
import tempfile
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from ckpt_engine import wire

logger = logging.getLogger(__name__)

MAX_UNIX_PATH = 107
_MONITOR_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED


class SocketDir:
    """Where one process's sockets live: a private 0700 directory, or the abstract namespace."""

    def __init__(self, base: str, run_id: str) -> None:
        self.abstract = base == "@"
        self.run_id = run_id
        self.path = (
            None
            if self.abstract
            else tempfile.mkdtemp(prefix=f"{SOCKET_DIR_PREFIX}{run_id}-", dir=base)
        )

    def address(self, name: str) -> str:
        """An address for ``name`` with a fresh random token in it."""
        token = secrets.token_hex(16)
        if self.path is None:
            return f"ipc://@ckpt-engine-{self.run_id}-{name}-{token}"
        path = os.path.join(self.path, f"{name}-{token}.sock")
        if len(path.encode()) > MAX_UNIX_PATH:
            raise ValueError(
                f"socket path {path!r} is longer than {MAX_UNIX_PATH} bytes; "
                "set CKPT_ENGINE_SOCKET_DIR to a shorter directory"
            )
        return f"ipc://{path}"

    def close(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None


def ipc_path(address: str) -> str | None:
    """The filesystem path of an ``ipc://`` address (None for abstract names and other kinds)."""
    if address.startswith("ipc://") and not address.startswith("ipc://@"):
        return address[len("ipc://") :]
    return None


SOCKET_DIR_PREFIX = "ckpt-engine-"


def check_local_address(address: str) -> None:
    """Refuse (ValueError naming the address) any address that is not a local socket of a
    parameter server: ``ipc://<dir>/ckpt-engine-*/<name>.sock`` in a directory owned by this user
    with no access for anyone else (what `SocketDir` creates), or an abstract
    ``ipc://@ckpt-engine-*`` name. A worker connects only there: the addresses come from an HTTP
    caller, and a ``tcp://`` or foreign address would make the worker talk to a peer that is not
    its colocated parameter server."""
    if address.startswith("ipc://@"):
        if address.startswith(f"ipc://@{SOCKET_DIR_PREFIX}"):
            return
        raise ValueError(
            f"refusing to connect to {address!r}: not an abstract {SOCKET_DIR_PREFIX}* socket"
        )
    path = ipc_path(address)
    if path is None:
        raise ValueError(
            f"refusing to connect to {address!r}: a worker connects only to a local ipc:// socket "
            f"of its parameter server (ipc://<dir>/{SOCKET_DIR_PREFIX}*/<name>.sock)"
        )
    parent = os.path.dirname(path)
    if (
        not os.path.isabs(path)
        or os.path.normpath(path) != path
        or not os.path.basename(parent).startswith(SOCKET_DIR_PREFIX)
        or not path.endswith(".sock")
    ):
        raise ValueError(
            f"refusing to connect to {address!r}: not a socket in a parameter server's private "
            f"directory (ipc://<dir>/{SOCKET_DIR_PREFIX}*/<name>.sock)"
        )
    try:
        st = os.lstat(parent)
    except OSError as e:
        raise ValueError(f"no parameter server socket directory at {parent}: {e}") from e
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ValueError(
            f"refusing to connect to {address!r}: {parent} is not a private directory of this "
            "user (mode 0700)"
        )


class Channel:
    """A socket plus its monitor: framed JSON messages, waits with deadlines, peer counts."""

    READY, LOST, EXTRA, TIMEOUT = "ready", "lost", "extra", "timeout"

    def __init__(self, sock: zmq.Socket, *, max_bytes: int) -> None:
        self.sock = sock
        self.max_bytes = max_bytes
        self.monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
        self.connections = 0  # peers connected now
        self.ever_connected = 0  # peers that ever connected

    def refresh(self) -> None:
        """Take the monitor's pending events into the peer counts."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event in (zmq.EVENT_ACCEPTED, zmq.EVENT_CONNECTED):
                self.connections += 1
                self.ever_connected += 1
            elif event == zmq.EVENT_DISCONNECTED:
                self.connections = max(0, self.connections - 1)

    @property
    def peer_lost(self) -> bool:
        return self.ever_connected > 0 and self.connections == 0

    def wait(self, flag: int, deadline: float, extra: zmq.Socket | None = None) -> str:
        """Wait until the socket has ``flag`` (POLLIN / POLLOUT), the peer is lost,
        ``extra`` has input, or ``deadline`` (time.monotonic) passes."""
        poller = zmq.Poller()
        poller.register(self.sock, flag)
        poller.register(self.monitor, zmq.POLLIN)
        if extra is not None:
            poller.register(extra, zmq.POLLIN)
        while True:
            self.refresh()
            if self.sock.poll(0, flag):
                return self.READY
            if self.peer_lost:
                return self.READY if self.sock.poll(0, flag) else self.LOST
            if extra is not None and extra.poll(0):
                return self.EXTRA
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self.TIMEOUT
            poller.poll(max(1, int(remaining * 1000)))

    def send(self, msg: wire.Message) -> None:
        """Send without blocking; zmq.Again if no peer can take it now."""
        self.sock.send_multipart(wire.encode_frames(msg, max_bytes=self.max_bytes), zmq.NOBLOCK)

    def recv(self) -> wire.Message:
        """Receive one waiting message (call after wait() returned READY for POLLIN)."""
        return wire.decode_frames(self.sock.recv_multipart(zmq.NOBLOCK), max_bytes=self.max_bytes)

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close()
