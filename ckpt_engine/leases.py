"""Who owns what a parameter-server run leaves on the host, and who removes it once the owner
is gone.

A run (one `ParameterServer`, run id = 8 hex digits) creates files ``ckpt-engine-<run id>-*`` in
the shared-memory directory (host buffers, CPU IPC buffers, P2P staging) and socket directories
``ckpt-engine-<run id>-*`` in the socket directory. It removes them as it closes; a process
killed with SIGKILL cannot, and on a host that runs an RL loop for weeks they would fill
/dev/shm. So:

- `RunLease`: a run holds an exclusive ``flock`` on ``<shm dir>/ckpt-engine-<run id>.lock`` for
  its whole life. The kernel drops the lock when the process dies, however it dies. The file is
  created under a temporary name, locked, then renamed, so a lock file is never seen unlocked
  while its owner lives.
- `sweep()`: run by every new `ParameterServer` and by a worker's first update in a process. It
  tries each lock file without waiting; when it gets the lock, the owner is gone: the run's
  files, socket directories and lock file are removed. Nothing without a lock file is touched
  (files of other tools, or of versions before this one), nor anything of another user.
- `install_sigterm_cleanup()`: opt-in for a process (the torchrun updater) that torchrun may
  SIGTERM: the main thread exits through its ``finally`` blocks (SystemExit); if it is blocked
  in a collective and cannot, a thread removes the files of every run of this process after a
  grace period and exits with 128 + SIGTERM. `StopSignals.soften` (the watching updater) turns
  SIGTERM and SIGINT into a stop request the main thread acts on at its next safe point.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

PREFIX = "ckpt-engine-"
LOCK_SUFFIX = ".lock"
_RUN_ID = re.compile(r"[0-9a-f]{8,32}")

_swept = False  # `sweep_once` ran in this process
_atexit_registered = False
_live: dict[str, RunLease] = {}  # run id -> lease, of this process
_live_lock = threading.Lock()


class RunLease:
    """The lock that marks run ``run_id``'s files as owned by a live process."""

    def __init__(self, run_id: str, *, shm_dir: str, socket_dir: str) -> None:
        if not _RUN_ID.fullmatch(run_id):
            raise ValueError(f"run id {run_id!r} is not 8-32 hex digits")
        self.run_id, self.shm_dir, self.socket_dir = run_id, shm_dir, socket_dir
        self.path = os.path.join(shm_dir, f"{PREFIX}{run_id}{LOCK_SUFFIX}")
        staging = f"{self.path}.{secrets.token_hex(4)}.tmp"
        fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(staging, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(staging)
            raise
        self._fd: int | None = fd
        self.pid = os.getpid()  # a forked child inherits the object, not the ownership
        _track(self)

    @classmethod
    def acquire(cls, run_id: str, *, shm_dir: str, socket_dir: str) -> RunLease | None:
        """A lease, or None (logged) where the lock file cannot be made: the run works, but a
        crash of it would leave its files for an operator to remove."""
        try:
            return cls(run_id, shm_dir=shm_dir, socket_dir=socket_dir)
        except OSError as e:
            logger.warning(
                "run %s: no lock file in %s (%s): files of this run left by a "
                "crash will not be removed automatically",
                run_id,
                shm_dir,
                e,
            )
            return None

    def remove_files(self) -> list[str]:
        """Remove every file and socket directory of this run (not the lock)."""
        return _remove_run(self.run_id, self.shm_dir, self.socket_dir)

    def close(self) -> None:
        """The run ended cleanly (its own files are gone): drop the lock file. Idempotent."""
        with _live_lock:
            _live.pop(self.run_id, None)
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def _track(lease: RunLease) -> None:
    """Count `lease` as live; the first one registers `remove_all_live` at exit, so an exit that
    skipped `close()` (a cleanup interrupted by SIGTERM, a forgotten close) still removes."""
    global _atexit_registered
    with _live_lock:
        _live[lease.run_id] = lease
        if not _atexit_registered:
            atexit.register(remove_all_live)
            _atexit_registered = True


def sweep(shm_dir: str, socket_dir: str) -> list[str]:
    """Remove what runs of dead processes left in ``shm_dir`` and ``socket_dir``; the paths
    removed. Never raises for a file it cannot read or remove (it is skipped)."""
    removed: list[str] = []
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(PREFIX) and name.endswith(LOCK_SUFFIX)):
            continue
        run_id = name[len(PREFIX) : -len(LOCK_SUFFIX)]
        if not _RUN_ID.fullmatch(run_id) or run_id in _live:
            continue
        path = os.path.join(shm_dir, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue  # gone meanwhile, or not ours
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its owner is alive
            removed += _remove_run(run_id, shm_dir, socket_dir)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
        finally:
            os.close(fd)
    if removed:
        logger.warning(
            "removed %d leftovers of dead ckpt-engine processes: %s",
            len(removed),
            ", ".join(removed[:5]) + (", ..." if len(removed) > 5 else ""),
        )
    return removed


def sweep_once(shm_dir: str, socket_dir: str) -> None:
    """`sweep` the first time it is called in this process (a worker's first update)."""
    global _swept
    if not _swept:
        _swept = True
        sweep(shm_dir, socket_dir)


def _remove_run(run_id: str, shm_dir: str, socket_dir: str) -> list[str]:
    prefix, uid, removed = f"{PREFIX}{run_id}-", os.getuid(), []
    for folder, want_dir in ((shm_dir, False), (socket_dir, True)):
        if folder == "@":  # abstract socket names: nothing on disk
            continue
        try:
            names = [n for n in os.listdir(folder) if n.startswith(prefix)]
        except OSError:
            continue
        for name in names:
            path = os.path.join(folder, name)
            try:
                st = os.lstat(path)
                if st.st_uid != uid:
                    continue
                if want_dir and stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(path)
                elif stat.S_ISREG(st.st_mode):
                    os.unlink(path)
                else:
                    continue
            except OSError:
                continue
            removed.append(path)
    return removed


def remove_all_live() -> list[str]:
    """Remove the files of every run of this process (their owners are about to exit)."""
    with _live_lock:
        leases = [lease for lease in _live.values() if lease.pid == os.getpid()]
    removed: list[str] = []
    for lease in leases:
        removed += lease.remove_files()
        lease.close()
    return removed


class StopSignals:
    """What `install_sigterm_cleanup` installed: the handler, and the thread that ends a process
    its main thread cannot end. ``soften`` turns the stop into a request (the watching updater)."""

    def __init__(self, label: str, grace_s: float) -> None:
        self.label = label
        self.grace_s = grace_s
        self.signum: int | None = None  # the first stop signal received
        self._soft: Callable[[int], None] | None = None
        self._second = False

    def soften(self, on_stop: Callable[[int], None], *, grace_s: float) -> None:
        """SIGTERM and SIGINT call ``on_stop(signum)`` instead of raising, so the main thread
        stops at its next safe point (the watching updater finishes a push in flight); a second
        signal raises SystemExit at once; the thread ends the process ``grace_s`` after the
        first signal if it is still alive. Call from the main thread."""
        self._soft, self.grace_s = on_stop, grace_s
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
            if self._soft is None:
                raise SystemExit(128 + signum)
            self._soft(signum)
        elif self._soft is not None and not self._second:  # asked twice: stop now
            self._second = True
            raise SystemExit(128 + self.signum)
        # else once: a further signal must not interrupt the cleanup

    def _watch(self, read_fd: int) -> None:
        while True:
            got = set(os.read(read_fd, 64))
            if signal.SIGTERM in got or (self._soft is not None and signal.SIGINT in got):
                break
        threading.Event().wait(self.grace_s)  # the main thread's own cleanup, if it can run
        removed = remove_all_live()
        code = 128 + (self.signum or signal.SIGTERM)
        print(
            f"{self.label}: {signal.Signals(code - 128).name}: removed {len(removed)} IPC "
            "buffer/socket path(s); exiting",
            file=sys.stderr,
            flush=True,
        )
        os._exit(code)


def install_sigterm_cleanup(label: str = "ckpt-engine", *, grace_s: float = 5.0) -> StopSignals:
    """On SIGTERM: raise SystemExit(128 + SIGTERM) in the main thread, so its ``finally``
    blocks run (a `ParameterServer.close()` removes the run's files; where the SystemExit lands
    in the middle of that cleanup, the leases' ``atexit`` hook finishes it); if the process has
    not exited ``grace_s`` later (the main thread is blocked in C: a collective, a wait), a daemon
    thread removes the files of every live run, says so on stderr and exits with that code at
    once. torchrun waits 30 s between its SIGTERM and its SIGKILL.

    The signal also wakes a pipe (`signal.set_wakeup_fd`) that the thread reads, which works
    whatever the main thread is doing. Call from the main thread, once."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    stops = StopSignals(label, grace_s)
    signal.signal(signal.SIGTERM, stops._on_signal)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(
        target=stops._watch, args=(read_fd,), name="ckpt-engine-sigterm", daemon=True
    ).start()
    return stops
