"""Leftovers of dead parameter-server runs: removed by the next sweep, only when their owner is
gone; SIGTERM cleanup of a process blocked in a wait."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ckpt_engine import leases

OWNER = textwrap.dedent(
    """
    import os, signal, sys, time
    from ckpt_engine import host_memory, leases
    from ckpt_engine.channel import SocketDir
    run_id, shm_dir, sock_dir, mode = sys.argv[1:5]
    if mode != "plain":
        leases.install_sigterm_cleanup("owner", grace_s=0.5)
    lease = leases.RunLease(run_id, shm_dir=shm_dir, socket_dir=sock_dir)
    buf = host_memory.create_shm(4096, shm_dir=shm_dir, label=f"{run_id}-r0-ipc")
    sockets = SocketDir(sock_dir, run_id)
    try:
        if mode == "blocked":  # in C, as in a collective: no Python handler runs here
            import ctypes
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            print("ready", flush=True)
            ctypes.CDLL(None).sleep(60)
        else:
            print("ready", flush=True)
            while True:
                time.sleep(0.05)
    finally:  # what ParameterServer.close() does
        buf.close()
        sockets.close()
        lease.close()
        print("closed cleanly", file=sys.stderr, flush=True)
    """
)


def _start(run_id: str, shm: Path, sock: Path, mode: str = "plain") -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER, run_id, str(shm), str(sock), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def _ours(folder: Path, run_id: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith(f"ckpt-engine-{run_id}"))


@pytest.fixture
def dirs(tmp_path):
    shm, sock = tmp_path / "shm", tmp_path / "sock"
    shm.mkdir()
    sock.mkdir()
    return shm, sock


def test_sweep_removes_only_what_dead_owners_left(dirs):
    shm, sock = dirs
    dead, alive = _start("dead0001", shm, sock), _start("a11ce002", shm, sock)
    try:
        (shm / "ckpt-engine-0badc0de-r0-x").write_bytes(b"no lock file: not ours to judge")
        dead.kill()
        dead.wait(30)
        assert len(_ours(shm, "dead0001")) == 2 and len(_ours(sock, "dead0001")) == 1
        removed = leases.sweep(str(shm), str(sock))
        assert _ours(shm, "dead0001") == [] and _ours(sock, "dead0001") == []
        assert len(removed) == 3  # the IPC buffer, the socket directory, the lock file
        assert len(_ours(shm, "a11ce002")) == 2 and len(_ours(sock, "a11ce002")) == 1
        assert (shm / "ckpt-engine-0badc0de-r0-x").exists()
        assert leases.sweep(str(shm), str(sock)) == []
    finally:
        for p in (dead, alive):
            p.kill()
            p.wait(30)


@pytest.mark.parametrize("mode", ["waiting", "blocked"])
def test_sigterm_removes_the_files_and_exits_nonzero(dirs, mode):
    """SIGTERM: the main thread exits through its `finally`; one blocked in C cannot, and the
    watcher thread removes the files after the grace period."""
    shm, sock = dirs
    proc = _start("5e67e4a1", shm, sock, mode)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
        err = proc.stderr.read()
        if mode == "waiting":
            assert "closed cleanly" in err and "SIGTERM: removed" not in err, err
        else:  # the thread's fallback (or, where the C call was interrupted, the main thread)
            assert "SIGTERM: removed 2" in err or "closed cleanly" in err, err
        assert _ours(shm, "5e67e4a1") == [] and _ours(sock, "5e67e4a1") == []
    finally:
        proc.kill()
        proc.wait(30)


def test_a_lease_is_never_seen_unlocked(dirs):
    shm, sock = dirs
    lease = leases.RunLease("0123abcd", shm_dir=str(shm), socket_dir=str(sock))
    try:
        assert _ours(shm, "0123abcd") == ["ckpt-engine-0123abcd.lock"]
        leases._live.pop("0123abcd")  # as another process would see it
        assert leases.sweep(str(shm), str(sock)) == []  # held: alive
    finally:
        leases._live["0123abcd"] = lease
        lease.close()
    assert _ours(shm, "0123abcd") == []
