"""End to end, weight endpoints: fail closed under --wait-for-initial-weights with dummy
weights, the API key, payload validation of /update_weights_from_ipc, the RPC allowlist."""

from __future__ import annotations

import pytest
from workers_testutil import (
    KEY,
    NEW_TOKENS,
    PROMPT,
    hf_greedy,
    poll,
    skip_without_gpus,
    start_server,
    wait_until_up,
)

pytestmark = pytest.mark.slow


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("cpu", id="cpu"),
        pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
    ],
)
def waiting(request, checkpoints, tmp_path_factory):
    device = request.param
    skip_without_gpus(device, 2)
    path, hf_model = checkpoints["qwen3"]
    log = tmp_path_factory.mktemp("logs") / f"waiting-{device}.log"
    args = ["--tp", "2", "--device", device, "--dtype", "float32", "--load-format", "dummy"]
    args += ["--checkpoint-engine-wait-weights-before-ready"]  # SGLang's spelling
    args += ["--wait-for-initial-weights-timeout", "4", "--api-key", "secret"]
    server = start_server(path, *args, log=log)
    try:
        wait_until_up(server)
        yield server, path, hf_model
    finally:
        server.stop()


def test_wait_flag_fails_closed_until_real_weights_arrive(waiting):
    server, _, hf_model = waiting
    assert server.get("/ping").status_code == 200
    unready = {"waiting_for_initial_weights", "initial_weights_timeout"}  # 4 s may have passed
    r = server.get("/health")
    assert r.status_code == 503 and r.json()["status"] in unready
    r = server.post("/generate", {"input_ids": PROMPT})
    assert r.status_code == 503 and "no servable weights" in r.json()["message"]
    assert server.get("/weights_info", headers=KEY).json()["status"] in unready

    # An IPC update naming none of this server's devices is refused and changes nothing.
    r = server.post(
        "/update_weights_from_ipc", {"zmq_handles": {"CPU-x-0": "ipc://x"}}, headers=KEY
    )
    assert r.status_code == 400 and r.json()["success"] is False
    assert "no socket for this rank's device" in r.json()["message"]
    assert server.get("/health").json()["status"] in unready

    # The wait times out: still 503 (never report random weights as healthy).
    poll(
        lambda: server.get("/health").json()["status"] == "initial_weights_timeout",
        30,
        "the initial-weights wait to time out",
    )
    assert server.get("/health").status_code == 503
    assert server.post("/generate", {"input_ids": PROMPT}).status_code == 503

    # Real weights arrive (from disk through the allowlisted RPC): healthy, and correct.
    r = server.post("/collective_rpc", {"method": "update_weights_from_disk"}, headers=KEY)
    assert r.status_code == 200, r.text
    assert server.get("/health").status_code == 200
    r = server.post("/generate", {"input_ids": PROMPT, "max_new_tokens": NEW_TOKENS})
    assert r.json()["output_ids"][:NEW_TOKENS] == hf_greedy(hf_model, PROMPT, NEW_TOKENS)[0]


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}]
)
@pytest.mark.parametrize(
    "route, body",
    [
        ("/collective_rpc", {"method": "ping"}),
        ("/update_weights_from_ipc", {"zmq_handles": {"a": "b"}}),
        ("/update_weights_from_ipc", {"zmq_handles": "not a dict"}),
    ],
)
def test_weight_endpoints_refuse_a_wrong_api_key(waiting, route, body, headers):
    server, *_ = waiting
    r = server.post(route, body, headers=headers)
    assert r.status_code == 401 and "API key" in r.json()["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"zmq_handles": {"GPU-0": 1}},
        {"zmq_handles": {}},
        {"zmq_handles": ["ipc://x"]},
        {"zmq_handles": {"GPU-0": "ipc://x"}, "flush_cache": "yes"},
        {"zmq_handles": {"GPU-0": "ipc://x"}, "surprise": 1},
        {},
    ],
    ids=["non-str-address", "empty", "list", "flush-cache-str", "unknown-field", "missing"],
)
def test_update_weights_from_ipc_rejects_bad_payloads(waiting, body):
    server, *_ = waiting
    r = server.post("/update_weights_from_ipc", body, headers=KEY)
    assert r.status_code == 400
    assert r.json()["success"] is False and "invalid request" in r.json()["message"]


@pytest.mark.parametrize("method", ["__del__", "generate", "update_weights_from_ipc_v2"])
def test_collective_rpc_with_key_still_refuses_hostile_methods(waiting, method):
    server, *_ = waiting
    r = server.post("/collective_rpc", {"method": method}, headers=KEY)
    assert r.status_code == 400 and "allowed:" in r.json()["message"]
