"""The updater (ckpt_engine.update; examples/update.py runs it) without torchrun: the split, the
flags, and the HTTP client (TCP and UDS)."""

from __future__ import annotations

import json
import socketserver
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckpt_engine import update as upd

REPO = Path(__file__).resolve().parents[1]


def test_example_script_runs_the_packaged_updater():
    """examples/update.py is a thin script over ckpt_engine.update: same flags, same checks."""
    for cmd in (["examples/update.py"], ["-m", "ckpt_engine.update"]):
        r = subprocess.run(
            [sys.executable, *cmd, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0 and "--inference-parallel-size" in r.stdout, r.stderr
        r = subprocess.run(
            [sys.executable, *cmd, "--inference-parallel-size", "0"],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 2 and "--inference-parallel-size must be >= 1" in r.stderr


@pytest.mark.parametrize(
    "items, world, want",
    [
        ([("a", 5), ("b", 5), ("c", 1)], 2, [(["a", "c"], 6), (["b"], 5)]),
        ([("x", 3), ("y", 3), ("z", 3)], 3, [(["x"], 3), (["y"], 3), (["z"], 3)]),
        ([("big", 100), ("s1", 1), ("s2", 1)], 2, [(["big"], 100), (["s1", "s2"], 2)]),
        ([("a", 1)], 3, [(["a"], 1), ([], 0), ([], 0)]),
    ],
)
def test_greedy_split_is_deterministic_and_balanced(items, world, want):
    assert upd.greedy_split(items, world) == want
    assert upd.greedy_split(list(reversed(items)), world) == want  # input order does not matter


def _files(folder: Path, sizes: dict[str, dict[str, int]]) -> Path:
    folder.mkdir()
    for file, tensors in sizes.items():
        save_file({n: torch.zeros(k, dtype=torch.uint8) for n, k in tensors.items()}, folder / file)
    return folder


def test_split_uses_whole_files_when_balanced(tmp_path):
    path = _files(
        tmp_path / "c",
        {"a.safetensors": {"w1": 100, "w2": 100}, "b.safetensors": {"w3": 190}},
    )
    mode, shares = upd.split_checkpoint(path, 2)
    assert mode == "files"
    assert [s.nbytes for s in shares] == [200, 190]
    assert shares[0].files == (str(path / "a.safetensors"),)


def test_split_falls_back_to_tensors_when_files_are_unbalanced(tmp_path):
    path = _files(
        tmp_path / "c",
        {"a.safetensors": {"w1": 100, "w2": 100, "w3": 100}, "b.safetensors": {"w4": 10}},
    )
    mode, shares = upd.split_checkpoint(path, 2)
    assert mode == "tensors"
    assert sorted(s.nbytes for s in shares) == [110, 200]
    names = sorted(n for s in shares for _, n in s.tensors)
    assert names == ["w1", "w2", "w3", "w4"]


def test_split_refuses_a_tensor_in_two_files(tmp_path):
    path = _files(tmp_path / "c", {"a.safetensors": {"w": 4}, "b.safetensors": {"w": 4}})
    with pytest.raises(ValueError, match="tensor w is in both"):
        upd.split_checkpoint(path, 2)


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "give --checkpoint-path"),
        (["--checkpoint-path", "x", "--weight-version", "v"], "needs --inference-api"),
        (["--checkpoint-path", "x", "--endpoint", "localhost:1"], "must start with http"),
        (["--checkpoint-path", "x", "--inference-parallel-size", "0"], ">= 1"),
        (["--checkpoint-path", "x", "--update-method", "rdma"], "invalid choice"),
        (["--checkpoint-path", "x", "--surprise"], "unrecognized arguments"),
        (
            ["--checkpoint-path", "x", "--register-mode", "overlap", "--save-metas-file", "m"],
            "overlap",
        ),
    ],
)
def test_bad_flags_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        upd.UpdateArgs.from_cli(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--update-method", "p2p"], "--update-method p2p and --load-metas-file go together"),
        (["--load-metas-file", "m"], "--update-method p2p and --load-metas-file go together"),
        (["--update-method", "all"], "--update-method all is not supported"),
        (["--publish-metas", "a"], "--metas-registry and --publish-metas / --find-metas go"),
        (["--metas-registry", "grpc://mx:1", "--publish-metas", "a"], "only Redis is supported"),
        (["--metas-registry", "redis://r", "--find-metas", "a"], "--load-metas-file go together"),
    ],
)
def test_p2p_flags_refused(extra, message, capsys):
    try:
        code = upd.main(["--checkpoint-path", "x", *extra])
    except SystemExit as e:  # refused while parsing the flags
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "world, local, ips, message",
    [
        ("4", "4", "3", "4 ranks do not split into instances of 3"),
        ("4", "2", "4", "--inference-parallel-size 4 does not divide the 2 ranks per node"),
    ],
)
def test_instances_must_fit_the_nodes(monkeypatch, capsys, world, local, ips, message):
    for name, value in (("RANK", "0"), ("WORLD_SIZE", world), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    argv = ["--checkpoint-path", "x", "--inference-parallel-size", ips, "--device", "cpu"]
    assert upd.main(argv) == 2
    assert message in capsys.readouterr().err


def _denv(rank, world, local_rank, local_world):
    from ckpt_engine.env import DistEnv

    return DistEnv(
        rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
        master_addr="127.0.0.1", master_port=None,
    )  # fmt: skip


@pytest.mark.parametrize(
    "n, rank, world, local_rank, local_world, ips, want",
    [
        (1, 5, 8, 1, 4, 2, 0),  # one endpoint: every instance
        (4, 5, 8, 1, 4, 2, 2),  # one per instance, global order
        (2, 5, 8, 1, 4, 2, 0),  # one per instance of this node (2 nodes x 2 instances)
        (2, 7, 8, 3, 4, 2, 1),
        (2, 3, 4, 1, 4, 2, 1),  # one node: per instance = per local instance
    ],
)
def test_pick_endpoint(n, rank, world, local_rank, local_world, ips, want):
    urls = [f"http://h{i}" for i in range(n)]
    assert upd.pick_endpoint(urls, _denv(rank, world, local_rank, local_world), ips) == urls[want]


def test_pick_endpoint_refuses_other_counts():
    with pytest.raises(upd.ConfigError, match=r"3 endpoints for 4 instances \(2 per node\)"):
        upd.pick_endpoint(["http://a", "http://b", "http://c"], _denv(0, 8, 0, 4), 2)


def test_api_key_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv("CKPT_ENGINE_API_KEY", "k")
    assert upd.UpdateArgs.from_cli(["--checkpoint-path", "x"]).api_key == "k"
    assert upd.UpdateArgs.from_cli(["--checkpoint-path", "x", "--api-key", "j"]).api_key == "j"


class _Recorder(BaseHTTPRequestHandler):
    """A stand-in inference server: records requests, answers with the configured reply."""

    calls: list = []
    reply = (200, {"success": True, "results": [None, None]})

    def do_GET(self):
        self._answer()

    def do_POST(self):
        self._answer()

    def _answer(self):
        length = int(self.headers.get("content-length", 0))
        body = json.loads(self.rfile.read(length)) if length else None
        self.calls.append((self.command, self.path, self.headers.get("authorization"), body))
        status, payload = self.reply
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):
        sock, _ = super().get_request()
        return sock, ("uds", 0)  # BaseHTTPRequestHandler wants a (host, port) client address


@pytest.fixture
def uds_server(tmp_path):
    _Recorder.calls = []
    _Recorder.reply = (200, {"success": True, "results": [None, None]})
    path = str(tmp_path / "server.sock")
    server = _UnixServer(path, _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield path
    server.shutdown()
    server.server_close()


def test_client_over_uds_sends_both_request_shapes_with_the_key(uds_server):
    client = upd.InferenceClient("http://localhost", uds=uds_server, api_key="secret")
    client.wait_ready(5)
    handles = {"GPU-a": "ipc:///x/a.sock", "GPU-b": "ipc:///x/b.sock"}
    client.update(handles, api="collective_rpc", version=None, timeout_s=7)
    client.update(handles, api="update_weights_from_ipc", version="v2", timeout_s=7)
    (ping, rpc, ipc) = _Recorder.calls
    assert ping[:2] == ("GET", "/ping")
    assert rpc == (
        "POST",
        "/collective_rpc",
        "Bearer secret",
        {"method": "update_weights_from_ipc", "args": [handles], "timeout": 7},
    )
    assert ipc[1] == "/update_weights_from_ipc"
    assert ipc[3] == {"zmq_handles": handles, "flush_cache": True, "weight_version": "v2"}


@pytest.mark.parametrize(
    "reply",
    [(400, {"success": False, "message": "boom"}), (200, {"success": False, "message": "boom"})],
)
def test_client_raises_when_the_server_refuses(uds_server, reply):
    _Recorder.reply = reply
    client = upd.InferenceClient("http://localhost", uds=uds_server, api_key=None)
    with pytest.raises(upd.InferenceError, match="boom"):
        client.update({"k": "a"}, api="collective_rpc", version=None, timeout_s=5)


def test_client_accepts_vllms_empty_200(uds_server):
    _Recorder.reply = (200, None)
    client = upd.InferenceClient("http://localhost", uds=uds_server, api_key=None)
    client.update({"k": "a"}, api="collective_rpc", version=None, timeout_s=5)


def test_wait_ready_gives_up_with_the_cause(tmp_path):
    client = upd.InferenceClient("http://localhost", uds=str(tmp_path / "none.sock"), api_key=None)
    with pytest.raises(upd.InferenceError, match="not up after"):
        client.wait_ready(0.5)


class _RecordingClient(upd.InferenceClient):
    """vLLM's RL endpoints as calls recorded, no server."""

    def __init__(self):
        super().__init__("http://127.0.0.1:9", uds=None, api_key=None)
        self.posts = []

    def post(self, path, body=None, *, timeout_s=60):
        self.posts.append(path)
        return {}


@pytest.fixture
def overlap_job(tmp_path, monkeypatch):
    """A one-rank CPU job of `--register-mode overlap --inference-api weight_transfer`."""
    from types import SimpleNamespace

    from ckpt_engine import ParameterServer, PSConfig

    (tmp_path / "shm").mkdir()
    monkeypatch.setenv("CKPT_ENGINE_SHM_DIR", str(tmp_path / "shm"))
    monkeypatch.delenv("MASTER_PORT", raising=False)
    ps = ParameterServer(rank=0, world_size=1, device_type="cpu", config=PSConfig(timeout_s=10.0))
    args = SimpleNamespace(
        checkpoint_name="step", timeout=10.0, wire="ckpt-engine",
        inference_api="weight_transfer", inference_parallel_size=1, weight_version=None,
    )  # fmt: skip
    job = upd.Job(args=args, ps=ps, control=None, client=_RecordingClient())
    yield job
    ps.close()


def test_a_step_failing_before_its_update_resumes_vllm(overlap_job, tmp_path):
    """A file cut short after the split (the trainer rewrote it): registering fails on the
    rank before any worker is sent anything, so the paused vLLM is resumed and the error says
    so, naming the file."""
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(1000)}, path)
    with open(path, "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    share = upd.Share(files=(str(path),), nbytes=4000)
    with pytest.raises(upd.UpdateError, match=r"model\.safetensors") as info:
        upd.broadcast_update(overlap_job, share)
    assert "refused before any write: vLLM resumed" in str(info.value)
    assert info.value.__cause__ is not None and overlap_job.client.posts == ["/resume"]
    assert not overlap_job.ps.last_step_reached_update


def test_a_step_failing_in_its_update_leaves_vllm_paused(overlap_job, tmp_path):
    """Past the registration the update's own outcome decides: here no worker answers, and
    vLLM stays paused unless every rank proves it sent nothing (the update's UpdateError)."""
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(1000)}, path)

    def req_func(socket_paths):
        raise RuntimeError("inference server gone")

    overlap_job.req_func = req_func
    share = upd.Share(files=(str(path),), nbytes=4000)
    with pytest.raises(upd.UpdateError) as info:
        upd.broadcast_update(overlap_job, share)
    assert overlap_job.ps.last_step_reached_update
    assert "not registered" not in str(info.value)  # the update's own error, passed on
    resumed = overlap_job.client.posts == ["/resume"]
    assert resumed == info.value.__cause__.untouched
