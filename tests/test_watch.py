"""The watching updater (ckpt_engine/updater/watch.py) without a server: the completeness rule,
the order, superseded and refused checkpoints, the flags, and its stops (SIGTERM 143, SIGINT
130, idle timeout 0) as a process against a stub server. End to end: tests/test_e2e_watch.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from workers_testutil import poll, stop_group

from ckpt_engine.ps.collectives import ControlGroup
from ckpt_engine.updater.config import UpdateArgs
from ckpt_engine.updater.watch import (
    MARKER,
    StopRequest,
    Watcher,
    list_checkpoints,
    natural_key,
)

REPO = Path(__file__).resolve().parents[1]
ONE_RANK = ControlGroup(None, rank=0, world_size=1)  # a world of one: no process group needed


def make(root: Path, name: str, *, complete: bool = True) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "model.safetensors").write_bytes(b"")
    if complete:
        (root / name / MARKER).touch()


def test_natural_order():
    names = ["step-10", "step-9", "step-100", "a", "step-9b"]
    assert sorted(names, key=natural_key) == ["a", "step-9", "step-9b", "step-10", "step-100"]


def test_listing_applies_the_completeness_rule(tmp_path):
    for name in ("step-7", "step-9", "step-10"):
        make(tmp_path, name)
    make(tmp_path, "step-11", complete=False)  # files without the marker
    make(tmp_path, ".tmp-step-12")  # hidden: being written
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "step-13").mkdir()
    (tmp_path / "step-13" / MARKER).mkdir()  # a marker must be a file
    seen = list_checkpoints(tmp_path, after="step-8", refused={"step-10"})
    assert seen.complete == ("step-9",)
    assert seen.incomplete == ("step-11", "step-13")
    assert seen.older == ("step-7",)
    assert list_checkpoints(tmp_path / "absent", after=None, refused=set()).complete == ()


def test_newest_pushed_superseded_skipped_refused_once(tmp_path, caplog):
    """step-1, step-2 complete: step-2 pushed (step-1 superseded); while it is pushed the
    trainer writes step-3 (refused by the push) and step-4 without its marker: nothing more is
    pushed, the idle timeout ends the loop with 0."""
    make(tmp_path, "step-1")
    make(tmp_path, "step-2")
    calls = []

    def push(path, pushed):
        calls.append((path.name, pushed.skipped, pushed.number))
        if path.name == "step-2":
            make(tmp_path, "step-3")
            make(tmp_path, "step-4", complete=False)
        else:
            raise ValueError(f"{path}/model.safetensors: truncated")

    watcher = Watcher(tmp_path, ONE_RANK, interval_s=0.05, idle_timeout_s=0.3)
    with caplog.at_level("INFO", logger="ckpt_engine.examples.update"):
        assert watcher.run(push) == 0
    assert calls == [("step-2", ("step-1",), 1), ("step-3", (), 2)]
    assert watcher.last == "step-2" and watcher.pushes == 1
    assert watcher.refused == {"step-1", "step-3"}
    log = caplog.text
    assert "skipping step-1: superseded by step-2" in log
    assert "refused step-3" in log and "still serving step-2" in log
    assert "step-4 is not complete yet" in log and "no new checkpoint for 0.3 s" in log


def test_max_updates_and_a_late_older_name(tmp_path, caplog):
    make(tmp_path, "step-5")
    pushed = []

    def push(path, info):
        pushed.append(path.name)
        if path.name == "step-5":
            make(tmp_path, "step-4")  # appears after step-5 was pushed: ignored
            make(tmp_path, "step-6")

    watcher = Watcher(tmp_path, ONE_RANK, interval_s=0.05, max_updates=2)
    with caplog.at_level("INFO", logger="ckpt_engine.examples.update"):
        assert watcher.run(push) == 0
    assert pushed == ["step-5", "step-6"]
    assert "ignoring step-4: it sorts before step-5" in caplog.text
    assert "--watch-max-updates 2 reached" in caplog.text


def test_stop_request_and_fatal_refusal(tmp_path):
    stop = StopRequest()
    stop(signal.SIGTERM)
    assert Watcher(tmp_path, ONE_RANK, stop=stop).run(lambda p, i: None) == 143
    make(tmp_path, "step-1")

    def push(path, info):
        raise RuntimeError("control group broken")

    with pytest.raises(RuntimeError, match="broken"):
        Watcher(tmp_path, ONE_RANK).run(push, fatal=lambda e: True)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--checkpoint-path", "x"], "not with --checkpoint-path"),
        (["--weight-version", "v", "--inference-api", "update_weights_from_ipc"], "version"),
        (["--save-metas-file", "m"], "--save-metas-file"),
        (["--result-file", "r"], "--json-out"),
        (["--watch-interval", "0"], "--watch-interval must be positive"),
        (["--watch-max-updates", "0"], "--watch-max-updates must be positive"),
    ],
)
def test_watch_flags_refused(extra, message, capsys):
    with pytest.raises(SystemExit) as info:
        UpdateArgs.from_cli(["--watch", "d", *extra])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_watch_options_need_watch(capsys):
    with pytest.raises(SystemExit):
        UpdateArgs.from_cli(["--checkpoint-path", "x", "--watch-idle-timeout", "5"])
    assert "--watch-idle-timeout goes with --watch" in capsys.readouterr().err


def test_each_push_is_a_single_update_named_after_its_folder():
    args = UpdateArgs.from_cli(["--watch", "d", "--inference-api", "update_weights_from_ipc"])
    one = args.for_checkpoint("d/step-3", "step-3")
    assert (one.checkpoint_path, one.checkpoint_name, one.weight_version) == (
        "d/step-3",
        "step-3",
        "step-3",
    )
    assert UpdateArgs.from_cli(["--watch", "d"]).for_checkpoint("p", "n").weight_version is None


class _Ping(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ping)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "how, code",
    [("SIGTERM", 143), ("SIGINT", 130), ("idle", 0)],
)
def test_watcher_process_stops(how, code, stub_server, tmp_path):
    """One rank (no torchrun) watching an empty folder: a signal stops it with 128 + signal
    number, --watch-idle-timeout with 0; its files are gone either way."""
    log = tmp_path / "log"
    cmd = [sys.executable, "-m", "ckpt_engine.update", "--watch", str(tmp_path / "ckpts")]
    cmd += ["--endpoint", stub_server, "--device", "cpu", "--inference-parallel-size", "1"]
    cmd += ["--watch-interval", "0.1"] + (["--watch-idle-timeout", "1"] if how == "idle" else [])
    env = {**os.environ, "CKPT_ENGINE_SHM_DIR": str(tmp_path)}
    env.pop("RANK", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    try:
        poll(lambda: "watching" in log.read_text() or proc.poll() is not None, 120, "watching")
        if how != "idle":
            os.kill(proc.pid, getattr(signal, how))
        proc.wait(60)
    finally:
        stop_group(proc)
    out = log.read_text()
    assert proc.returncode == code, out
    assert ("stopped by " + how) in out if how != "idle" else "no new checkpoint for 1.0 s" in out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ckpt-engine-")]


def _rank(rank: int, port: int, root: str, out: str) -> None:
    """One of two gloo ranks running the loop, each with a folder of its own: rank 1's holds
    other names, so a rank acting on its own listing would push something else."""
    import json
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    control = ControlGroup(dist.new_group(backend="gloo"), rank=rank, world_size=2)
    stop = StopRequest()
    pushed = []

    def push(path, info):
        pushed.append(path.name)
        if rank == 0 and path.name == "step-3":  # the trainer's next checkpoint
            make(Path(root) / "rank0", "step-4")
        if rank == 1 and len(pushed) == 2:
            stop(signal.SIGTERM)  # one rank's signal stops both, after this push

    folder = Path(root) / f"rank{rank}"
    code = Watcher(folder, control, interval_s=0.05, timeout_s=60, stop=stop).run(push)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"pushed": pushed, "code": code}))
    dist.destroy_process_group()


def _two_ranks(target, tmp_path) -> list[dict]:
    """``target(rank, port, root, out)`` on two spawned ranks (joined within 120 s, else
    killed); each rank's JSON result."""
    import json

    import torch.multiprocessing as mp
    from workers_testutil import free_port

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=target, args=(r, port, str(tmp_path), str(tmp_path))) for r in (0, 1)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(120)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_ranks_push_what_rank_0_decides_and_stop_together(tmp_path):
    """Two gloo ranks: both push what rank 0 lists (rank 1's own folder differs), and a stop
    request on rank 1 alone ends both after the push in flight, with 143."""

    make(tmp_path / "rank0", "step-1")
    make(tmp_path / "rank0", "step-2")
    make(tmp_path / "rank0", "step-3")
    make(tmp_path / "rank1", "step-9")  # never pushed: rank 1 does not list
    (tmp_path / "rank1" / "step-1").mkdir()  # its view of a checkpoint: no marker
    # step-3 (the newest), then step-4 (written during step-3's push), then the stop
    results = _two_ranks(_rank, tmp_path)
    assert [r["pushed"] for r in results] == [["step-3", "step-4"]] * 2
    assert [r["code"] for r in results] == [143, 143]


def _rank_unlistable(rank: int, port: int, root: str, out: str) -> None:
    """One of two gloo ranks whose rank 0 cannot list DIR (a file, not a folder)."""
    import json
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    control = ControlGroup(dist.new_group(backend="gloo"), rank=rank, world_size=2)
    folder = Path(root) / ("not-a-folder" if rank == 0 else "rank1")
    try:
        Watcher(folder, control, interval_s=0.05, timeout_s=60).run(lambda p, i: None)
        result = {"error": None}
    except Exception as e:
        result = {"error": f"{type(e).__name__}: {e}"}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_a_directory_rank_0_cannot_list_fails_every_rank_naming_it(tmp_path):
    """Rank 0 lists DIR for every rank: when it cannot (here DIR is a file), every rank fails
    with the same error naming DIR, instead of rank 0 alone leaving the loop while the others
    wait in the round's all-gather."""
    from ckpt_engine.errors import CheckpointFileError

    (tmp_path / "not-a-folder").write_text("a file")
    (tmp_path / "rank1").mkdir()
    with pytest.raises(CheckpointFileError, match="not-a-folder: cannot list"):
        Watcher(tmp_path / "not-a-folder", ONE_RANK).run(lambda p, i: None)
    errors = [r["error"] for r in _two_ranks(_rank_unlistable, tmp_path)]
    assert all(e is not None and e.startswith("CheckpointFileError") for e in errors), errors
    assert all("not-a-folder: cannot list the --watch directory (rank 0)" in e for e in errors)
