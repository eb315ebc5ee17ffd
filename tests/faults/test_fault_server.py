"""Faults against a running reference server (CPU), its updater and its forks, end to end.

One module-scoped seed server `S` (TP=1, float32, API key, fork delay 0.3 s per tensor) serves
checkpoint A; a disposable server `D` takes the rank kill. The tests run in file order and each
states the weights it expects; the destructive ones (a rank killed, the seed killed) come last.
Updates go through the real updater (`examples/update.py` under torchrun, SGLang's API so that
each carries a weight version). The updaters and servers share private shared-memory and
socket directories, so the leftovers of killed processes can be counted exactly.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from test_remote_instance_server import start_client
from workers_testutil import (
    KEY,
    PROMPT,
    make_hf_model,
    poll,
    run_updater,
    save_checkpoint,
    start_server,
    wait_until_up,
)

from ckpt_engine import device_key

pytestmark = pytest.mark.slow

GENERATE = {"input_ids": PROMPT, "max_new_tokens": 6, "sampling_params": {"ignore_eos": True}}
FORK_TIMEOUT_S = 15  # the seed's --remote-instance-weight-loader-timeout


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    # short paths: socket paths are limited to 107 bytes
    host = Path(tempfile.mkdtemp(prefix="cef-"))
    (host / "shm").mkdir()
    (host / "sock").mkdir()
    ckpts = {}
    for name, seed, extra in (("A", 0, {}), ("B", 1, {}), ("bad", 2, {"intermediate_size": 96})):
        model = make_hf_model("qwen3", seed=seed, **extra)
        ckpts[name] = save_checkpoint(model, work / name, tokenizer=True)
    model = make_hf_model("qwen3", seed=0).to(torch.bfloat16)
    ckpts["A-bf16"] = save_checkpoint(model, work / "A-bf16", tokenizer=True)
    env = {
        "CKPT_ENGINE_SHM_DIR": str(host / "shm"),
        "CKPT_ENGINE_SOCKET_DIR": str(host / "sock"),
        "CKPT_ENGINE_TEST_FAIL_UPDATE_FILE": str(work / "fail"),
        "CKPT_ENGINE_BUCKET_BYTES": str(16 << 10),  # many buckets: a failure can land mid-way
    }
    common = ["--tp", "1", "--device", "cpu", "--dtype", "float32"]
    seed_args = ["--api-key", "secret", "--weight-version", "A"]
    seed_args += ["--remote-instance-weight-loader-timeout", str(FORK_TIMEOUT_S)]
    servers = {
        "S": start_server(
            ckpts["A"], *common, *seed_args, log=work / "S.log",
            env={**env, "CKPT_ENGINE_TEST_FORK_DELAY_S": "0.3"},
        ),
        "D": start_server(ckpts["A"], *common, log=work / "D.log", env=env),
    }  # fmt: skip
    try:
        for server in servers.values():
            wait_until_up(server)
        yield {**servers, "ckpts": ckpts, "env": env, "work": work, "host": host}
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(host, ignore_errors=True)


def push(fleet, ckpt: str | Path, version: str, *extra: str, nproc: int = 1):
    """The updater (one instance of `nproc` ranks) into S: (returncode, output, seconds)."""
    path = fleet["ckpts"][ckpt] if isinstance(ckpt, str) else ckpt
    args = ["--inference-api", "update_weights_from_ipc", "--weight-version", version, *extra]
    start = time.monotonic()
    rc, out = run_updater(fleet["S"].url, path, *args, nproc=nproc, device="cpu", env=fleet["env"])
    return rc, out, time.monotonic() - start


def info(server) -> dict:
    r = server.get("/weights_info", headers=KEY)
    assert r.status_code == 200, r.text
    return r.json()


def health(server) -> tuple[int, dict]:
    r = server.get("/health", timeout=30)
    return r.status_code, r.json()


def serving(server, version: str) -> None:
    """S serves `version`: /health 200 and /weights_info ready with that version."""
    code, body = health(server)
    assert code == 200, body
    got = info(server)
    assert (got["status"], got["weight_version"]) == ("ready", version), got


def leftovers(fleet) -> list[str]:
    return sorted(
        n
        for folder in ("shm", "sock")
        for n in os.listdir(fleet["host"] / folder)
        if n.startswith("ckpt-engine-")
    )


# -- the HTTP front -------------------------------------------------------------------------------


def _raw_post(url: str, path: str, *, declared: int | None, total: int) -> tuple[int, int]:
    """POST `total` bytes (Content-Length `declared`, else chunked) until the server answers;
    (status, bytes sent before the answer)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {declared}\r\n" if declared else "Transfer-Encoding: chunked\r\n"
        s.sendall(head.encode() + b"\r\n")
        s.settimeout(5)
        sent, chunk = 0, b"[" * (1 << 20)
        while sent < total and not select.select([s], [], [], 0)[0]:
            try:
                s.sendall(chunk if declared else b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (TimeoutError, OSError):
                break  # the server stopped reading: its answer is waiting
            sent += len(chunk)
        s.settimeout(30)
        status_line = s.recv(4096).split(b"\r\n", 1)[0]
        return int(status_line.split()[1]), sent


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_oversized_bodies_are_refused_before_they_are_parsed(fleet, fault_row):
    server = fleet["S"]
    peak = _peak_rss_mib(server.proc.pid)
    start = time.monotonic()
    status, sent = _raw_post(server.url, "/generate", declared=300 << 20, total=300 << 20)
    seconds = time.monotonic() - start
    assert status == 413
    fault_row(
        "`/generate` (no key) with a 300 MB body (Content-Length)",
        "413 before the body is read",
        f"{status} after {sent >> 20} MiB sent",
        seconds,
        10,
    )
    start = time.monotonic()
    status, sent = _raw_post(server.url, "/generate", declared=None, total=300 << 20)
    seconds = time.monotonic() - start
    grew = _peak_rss_mib(server.proc.pid) - peak
    assert status == 413 and sent < 64 << 20 and grew < 100, (status, sent, grew)
    assert health(server)[0] == 200
    fault_row(
        "`/generate` (no key) with a 300 MB chunked body",
        "413 once 16 MiB (--max-request-bytes) arrived; front memory flat",
        f"{status} after {sent >> 20} MiB sent; front peak RSS +{grew:.0f} MiB",
        seconds,
        15,
    )


def test_bad_keys_are_refused_on_every_keyed_route(fleet, fault_row):
    server = fleet["S"]
    routes = [
        ("POST", "/collective_rpc", {"method": "ping"}),
        ("POST", "/update_weights_from_ipc", {"zmq_handles": {}}),
        ("GET", "/weights_info", None),
        ("GET", "/remote_instance_manifest", None),
        ("POST", "/init_weights_send_group_for_remote_instance", {}),
        ("POST", "/send_weights_to_remote_instance", {}),
    ]
    keys = [
        None,
        "Bearer wrong",
        "Bearer ",
        "Bearer SECRET",
        "secret",
        "Bearer secre",
        "Bearer secret2",
    ]
    start = time.monotonic()
    codes = set()
    for method, path, body in routes:
        for key in keys:
            headers = {} if key is None else {"Authorization": key}
            r = requests.request(method, server.url + path, json=body, headers=headers, timeout=30)
            assert r.status_code == 401, (path, key, r.status_code, r.text)
            codes.add(r.status_code)
    seconds = time.monotonic() - start
    serving(server, "A")
    fault_row(
        f"missing or wrong API key ({len(keys)} variants x {len(routes)} keyed routes, "
        "`/weights_info` included)",
        "401 on every one, nothing runs",
        f"{sorted(codes)} on all {len(keys) * len(routes)}",
        seconds,
        30,
    )


def test_hostile_collective_rpc_names_are_refused(fleet, fault_row):
    server = fleet["S"]
    names = ["__init__", "load_weights", "_maybe_inject_failure", "generate", "../ping",
             "ping\x00", "x" * 10_000, "update_weights_from_ipc ", "__class__", ""]  # fmt: skip
    start = time.monotonic()
    for name in names:
        r = server.post("/collective_rpc", {"method": name}, headers=KEY)
        assert r.status_code == 400 and "not allowed" in r.json()["message"], (name, r.text)
    seconds = time.monotonic() - start
    assert server.post("/collective_rpc", {"method": "ping"}, headers=KEY).status_code == 200
    serving(server, "A")
    fault_row(
        f"`/collective_rpc` with {len(names)} hostile method names (dunders, private, "
        "front-only, NUL, 10 kB)",
        "400 naming the allowlist; ranks untouched",
        "400 on all; ping 200 after",
        seconds,
        20,
    )


def test_health_recovers_after_a_rank_timeout(fleet, fault_row):
    server = fleet["S"]
    # 50k records keep the rank busy far longer than the 10 ms the call may take
    metas = [[f"x{i}", "float32", [1]] for i in range(50_000)]
    body = {"method": "check_weights", "args": [metas], "timeout": 0.01}
    r = server.post("/collective_rpc", body, headers=KEY)
    assert r.status_code == 504, r.text[:300]
    start = time.monotonic()
    body = poll(lambda: health(server)[0] == 200 and health(server)[1], 30, "/health 200")
    fault_row(
        "a rank times out (`/collective_rpc` check_weights of 50k records, 10 ms timeout)",
        "504; then /health probes the ranks and is 200 again once they answer",
        f"504, then /health 200 ({body['status']}) without any other command",
        time.monotonic() - start,
        30,
    )


def test_zmq_handles_to_a_remote_address_are_refused(fleet, fault_row):
    server = fleet["S"]
    handles = {device_key(0, device_type="cpu"): "tcp://127.0.0.1:9"}
    start = time.monotonic()
    r = server.post("/update_weights_from_ipc", {"zmq_handles": handles}, headers=KEY)
    seconds = time.monotonic() - start
    assert r.status_code == 400 and "refusing to connect to 'tcp://127.0.0.1:9'" in r.text, r.text
    serving(server, "A")  # nothing was written: still servable, not weights_inconsistent
    fault_row(
        "`zmq_handles` pointing a rank at `tcp://127.0.0.1:9`",
        "400 naming the address at once; the server serves on",
        "400 'refusing to connect'; /health 200, status ready",
        seconds,
        10,
    )


# -- updates that are refused before any write ------------------------------------------------------


def _refused(fleet, fault_row, ckpt, fault: str, needle: str, bound: float = 120) -> None:
    server = fleet["S"]
    before = info(server)
    rc, out, seconds = push(fleet, ckpt, "refused")
    assert rc == 1 and needle in out, out
    serving(server, before["weight_version"])
    assert info(server)["checksum"] == before["checksum"]
    line = next(x for x in out.splitlines() if needle in x).replace(str(fleet["work"]), "<tmp>")
    needle = needle.replace(str(fleet["work"]), "<tmp>")
    fault_row(
        fault,
        "updater exits 1 naming the cause; server serves its last weights (/health 200)",
        line[line.index(needle) - min(60, line.index(needle)) :][:160].strip(),
        seconds,
        bound,
    )


def test_a_floating_dtype_other_than_the_models_is_refused(fleet, fault_row):
    _refused(
        fleet,
        fault_row,
        "A-bf16",
        "update with bfloat16 tensors into a float32 model",
        "is not the model's float32",
    )


def test_an_update_that_does_not_fit_is_refused_before_any_write(fleet, fault_row):
    _refused(
        fleet,
        fault_row,
        "bad",
        "update whose MLP shapes do not fit the model",
        "does not fit the model's",
    )


@pytest.mark.parametrize("damage", ["truncated", "corrupt header"])
def test_corrupt_or_truncated_files_are_refused(fleet, fault_row, damage):
    path = fleet["work"] / f"A-{damage.replace(' ', '-')}"
    shutil.copytree(fleet["ckpts"]["A"], path)
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(
        data[: len(data) - 1000] if damage == "truncated" else b"\xff" * 16 + data[16:]
    )
    _refused(fleet, fault_row, path, f"checkpoint file {damage}", str(file))


# -- updates that fail after bytes were written --------------------------------------------------------


def test_a_worker_failing_mid_update_stops_serving_until_a_good_update(fleet, fault_row):
    server, fail = fleet["S"], fleet["work"] / "fail"
    fail.write_text("2")  # the rank raises in bucket 2
    try:
        rc, out, seconds = push(fleet, "B", "B-broken")
    finally:
        fail.unlink()
    assert rc == 1 and "injected failure in bucket 2" in out, out
    code, body = health(server)
    got = info(server)
    assert code == 503 and body["status"] == "weights_inconsistent", body
    assert got["weight_version"] == "A" and "injected failure" in got["detail"], got
    assert server.post("/generate", GENERATE).status_code == 503
    fault_row(
        "the worker raises in bucket 2 of an update (after bytes were written)",
        "update fails on every rank; /health and /generate 503, weights_inconsistent, "
        "version = last committed",
        f"updater rc 1; /health 503 {body['status']}; /weights_info version {got['weight_version']}",
        seconds,
        120,
    )
    rc, out, seconds = push(fleet, "B", "B")
    assert rc == 0, out
    serving(server, "B")
    fault_row(
        "a good update after a failed one",
        "200 again with the new weights",
        "updater rc 0; /health 200, version B",
        seconds,
        120,
    )


def _updater_pids(marker: str) -> list[int]:
    """The examples/update.py rank processes whose command line carries `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                any(c.endswith(b"examples/update.py") for c in cmd)
                and marker.encode() in cmd
                and not any(os.path.basename(c) == b"torchrun" for c in cmd[:2])  # not torchrun
            ):
                pids.append(int(entry.name))
    return pids


def test_the_updater_killed_mid_update(fleet, fault_row):
    server, fail = fleet["S"], fleet["work"] / "fail"
    reached = Path(str(fail) + ".reached")
    path = fleet["work"] / "A-killed"
    shutil.copytree(fleet["ckpts"]["A"], path)
    fail.write_text("3 wait")  # the rank pauses in bucket 3 (buckets 0-2 written)
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(out=push(fleet, path, "A-killed")), daemon=True
    )
    thread.start()
    try:
        poll(reached.exists, 120, "the update to reach bucket 3")
        # The update holds the front's lock now: cached checksums still answer, keyed only.
        start = time.monotonic()
        got = info(server)
        cached_s = time.monotonic() - start
        assert got["weight_version"] == "B" and cached_s < 5, (got, cached_s)
        assert server.get("/weights_info").status_code == 401
        fault_row(
            "`/weights_info` while an update holds the request lock",
            "needs the key (401 without); answers from the per-version cache, no wait",
            f"401 without key; 200 with, version {got['weight_version']}",
            cached_s,
            5,
        )
        (pid,) = _updater_pids(str(path))
        os.kill(pid, signal.SIGKILL)  # the trainer dies mid-update
        killed = time.monotonic()
    finally:
        fail.unlink()
    body = poll(
        lambda: (
            (h := health(server))[0] == 503 and h[1]["status"] == "weights_inconsistent" and h[1]
        ),
        60,
        "/health 503 weights_inconsistent",
    )
    seconds = time.monotonic() - killed
    thread.join(200)
    assert result["out"][0] != 0
    reached.unlink()
    fault_row(
        "the updater (trainer) SIGKILLed mid-update, after 3 buckets were written",
        "the worker notices at once; /health 503 weights_inconsistent until a good update",
        f"/health 503 {body['status']}: {body['detail'][:90]}",
        seconds,
        30,
    )
    left = leftovers(fleet)
    assert any(n.endswith(".lock") for n in left), left  # the killed run's lock, IPC file, sockets
    rc, out, seconds = push(fleet, "A", "A")
    assert rc == 0, out
    serving(server, "A")
    assert leftovers(fleet) == [], leftovers(fleet)
    fault_row(
        "IPC buffer, socket directory and lock left by the SIGKILLed updater",
        "removed by the next parameter server on the host (only those of dead processes)",
        f"{len(left)} leftovers before the next update, 0 after it (which succeeded)",
        seconds,
        120,
    )


def test_two_updates_at_once_apply_one_after_the_other(fleet, fault_row):
    from workers.demo import file_digests

    server = fleet["S"]
    results = {}
    threads = [
        threading.Thread(target=lambda v=v: results.update({v: push(fleet, v, v + "2")}))
        for v in ("A", "B")
    ]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    seconds = time.monotonic() - start
    assert all(rc == 0 for rc, _, _ in results.values()), results
    got = info(server)
    last = got["weight_version"][0]
    assert got["weight_version"] in ("A2", "B2") and got["status"] == "ready"
    served = {n: t["sha256"] for n, t in got["tensors"].items()}
    assert served == file_digests(fleet["ckpts"][last])
    fault_row(
        "two updaters push A and B into one server at once",
        "both succeed, one after the other (FIFO lock); the server holds exactly the last",
        f"both rc 0; serving {got['weight_version']}, every sha256 = checkpoint {last}",
        seconds,
        240,
    )


def test_generation_during_an_update_sees_one_version(fleet, fault_row):
    server = fleet["S"]
    before = server.post("/generate", GENERATE).json()
    target = "A" if before["weight_version"].startswith("B") else "B"
    outs, stop = [], threading.Event()

    def generate_until_stopped():
        while not stop.is_set():
            start = time.monotonic()
            r = server.post("/generate", GENERATE)
            outs.append((r.status_code, r.json(), time.monotonic() - start))

    gen = threading.Thread(target=generate_until_stopped)
    gen.start()
    try:
        rc, out, _ = push(fleet, target, target + "3")
    finally:
        stop.set()
        gen.join(120)
    assert rc == 0, out
    after = server.post("/generate", GENERATE).json()
    assert before["output_ids"] != after["output_ids"]
    allowed = {
        before["weight_version"]: before["output_ids"],
        after["weight_version"]: after["output_ids"],
    }
    for code, body, _ in outs:
        assert code == 200 and allowed[body["weight_version"]] == body["output_ids"], body
    versions = sorted({b["weight_version"] for _, b, _ in outs})
    fault_row(
        f"generation requests during an update ({len(outs)} requests)",
        "every request 200, computed with one version (the tokens of that version)",
        f"all 200; versions seen {versions}, each with its own tokens",
        max(s for _, _, s in outs),
        60,
    )


# -- the fork (remote instance), seed side ---------------------------------------------------------


def test_a_fork_init_no_client_joins_does_not_block_the_seed(fleet, fault_row):
    server = fleet["S"]
    body = {"master_address": "127.0.0.1", "ports": str(_free_port()), "group_rank": 0,
            "world_size": 2, "group_name": "nobody-comes", "backend": "gloo"}  # fmt: skip
    start = time.monotonic()
    r = server.post("/init_weights_send_group_for_remote_instance", body, headers=KEY)
    assert r.status_code == 200, r.text
    g = server.post("/generate", GENERATE)
    seconds = time.monotonic() - start
    assert g.status_code == 200, g.text
    fault_row(
        f"a fork init that no client joins (seed timeout {FORK_TIMEOUT_S} s)",
        "init answers at once; the seed's generation is not held up",
        f"init {r.status_code}, /generate {g.status_code}",
        seconds,
        10,
    )
    send = {k: body[k] for k in ("master_address", "ports", "group_name")}
    start = time.monotonic()
    r = server.post("/send_weights_to_remote_instance", send, headers=KEY)
    assert r.status_code == 400 and "no client joined" in r.text, r.text
    fault_row(
        "a send for that init",
        f"400 'no client joined' by the init's deadline ({FORK_TIMEOUT_S} s)",
        f"{r.status_code}: {r.json()['message'][:100]}",
        time.monotonic() - start,
        FORK_TIMEOUT_S + 10,
    )
    serving(server, info(server)["weight_version"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- processes killed --------------------------------------------------------------------------------


def test_an_updater_rank_killed_under_torchrun(fleet, fault_row, monkeypatch):
    server = fleet["S"]
    version = info(server)["weight_version"]
    path = fleet["work"] / "A-two-ranks"
    shutil.copytree(fleet["ckpts"]["A"], path)
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(
            out=push(fleet, path, "never", "--sleep-time", "600", nproc=2)
        ),
        daemon=True,
    )
    thread.start()
    locks = lambda: [n for n in leftovers(fleet) if n.endswith(".lock")]  # noqa: E731
    try:
        # each rank holds its lease once its ParameterServer exists (torch imported: slow on a
        # loaded machine)
        poll(lambda: len(locks()) == 2 and len(_updater_pids(str(path))) == 2, 300, "2 ranks")
        environ = {p: Path(f"/proc/{p}/environ").read_bytes() for p in _updater_pids(str(path))}
        rank1 = next(p for p, e in environ.items() if b"RANK=1" in e.split(b"\0"))
        os.kill(rank1, signal.SIGKILL)
        killed = time.monotonic()
        thread.join(200)
        seconds = time.monotonic() - killed
    finally:
        for pid in _updater_pids(str(path)):  # the test failed: no rank may outlive it
            os.kill(pid, signal.SIGKILL)
    rc, out, _ = result["out"]
    assert rc != 0, out
    left = leftovers(fleet)
    assert len([n for n in left if n.endswith(".lock")]) == 1, left  # only the killed rank's
    serving(server, version)
    fault_row(
        "an updater rank SIGKILLed under torchrun (which SIGTERMs the other)",
        "the updater exits non-zero; the SIGTERMed rank removes its files itself",
        f"torchrun rc {rc}; rank 0 left nothing (1 lock of 2 left: the killed rank's); "
        "server unchanged",
        seconds,
        60,
    )
    from ckpt_engine import ParameterServer

    for name, value in fleet["env"].items():
        monkeypatch.setenv(name, value)
    start = time.monotonic()
    ParameterServer(device_type="cpu").close()  # the next parameter server on this host
    assert leftovers(fleet) == [], leftovers(fleet)
    fault_row(
        "IPC socket directory and lock of the SIGKILLed rank",
        "removed by the next parameter server on the host",
        f"{len(left)} leftovers, 0 after a ParameterServer started",
        time.monotonic() - start,
        10,
    )


def test_a_server_rank_killed(fleet, fault_row):
    server = fleet["D"]
    (pid,) = [
        x["pid"] for x in server.post("/collective_rpc", {"method": "ping"}).json()["results"]
    ]
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    body = poll(lambda: (h := health(server))[0] == 503 and h[1], 30, "/health 503")
    seconds = time.monotonic() - start
    r = server.post("/generate", GENERATE)
    assert body["status"] == "rank_dead" and r.status_code == 503, (body, r.text)
    fault_row(
        "a server rank process SIGKILLed",
        "/health 503 rank_dead naming the rank; /generate 503",
        f"/health 503 {body['status']} ({body['detail']}); /generate {r.status_code}",
        seconds,
        10,
    )


def test_the_seed_killed_mid_fork(fleet, fault_row):
    seed = fleet["S"]
    path = fleet["ckpts"]["A"]
    timeout = ["--remote-instance-weight-loader-timeout", "20"]
    sends = seed.output().count("sending (")
    client = start_client(path, seed, tp=1, log=fleet["work"] / "client.log", extra=timeout)
    try:
        poll(lambda: seed.output().count("sending (") > sends, 120, "the seed to start sending")
        os.killpg(seed.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        rc = client.proc.wait(60)
        seconds = time.monotonic() - killed
    finally:
        client.stop()
        seed.stop()
    out = client.output()
    assert rc == 1 and "failed to start" in out and "seed" in out, out
    line = next(x for x in out.splitlines() if "failed to start" in x)
    fault_row(
        "the seed SIGKILLed while it sends a fork",
        "the client exits 1 naming the seed, within its timeout (20 s)",
        f"rc {rc}: {line[line.index('failed to start') :][:110]}",
        seconds,
        30,
    )
