"""End to end over the upstream checkpoint-engine wire, on CPU: `torchrun examples/update.py
--wire upstream` into a reference server whose ranks opted in with CKPT_ENGINE_WIRE=upstream.

The server then serves exactly transformers' greedy output; an update whose `run` fails in the
second bucket fails the updater and leaves the server failing closed; the next good one heals it.
(The GPU tests against upstream's own code: tests/ckpt_engine/test_compat_upstream_gpu.py.)
"""

from __future__ import annotations

import secrets

import pytest
from workers_testutil import (
    NEW_TOKENS,
    PROMPT,
    hf_greedy,
    make_hf_model,
    run_updater,
    save_checkpoint,
    start_server,
    wait_until_up,
)

pytestmark = pytest.mark.slow


def test_updater_and_server_over_the_upstream_wire(tmp_path):
    model = make_hf_model("qwen3", seed=0)
    ckpt = save_checkpoint(model, tmp_path / "ckpt", tokenizer=True)
    fail_file = tmp_path / "fail-at-bucket"
    # abstract socket names carry the device key: a unique host keeps concurrent runs apart
    env = {
        "CKPT_ENGINE_WIRE": "upstream",
        "CKPT_ENGINE_HOSTNAME": f"e2ecompat{secrets.token_hex(4)}",
        "CKPT_ENGINE_TEST_FAIL_UPDATE_FILE": str(fail_file),
    }
    server = start_server(
        ckpt, "--tp", "2", "--device", "cpu", "--api-key", "secret",
        "--load-format", "dummy", "--wait-for-initial-weights", log=tmp_path / "server.log", env=env,
    )  # fmt: skip
    updater_env = {"CKPT_ENGINE_HOSTNAME": env["CKPT_ENGINE_HOSTNAME"]}

    def push(**extra_env):
        return run_updater(
            server.url, ckpt, "--wire", "upstream", nproc=2, device="cpu",
            env={**updater_env, **extra_env},
        )  # fmt: skip

    try:
        wait_until_up(server)
        rc, out = push()
        assert rc == 0, out + server.output()[-3000:]
        assert server.get("/health").status_code == 200
        hf_ids, _ = hf_greedy(model, PROMPT, NEW_TOKENS)
        body = {"input_ids": PROMPT, "max_new_tokens": NEW_TOKENS}
        body["sampling_params"] = {"ignore_eos": True}
        assert server.post("/generate", body).json()["output_ids"] == hf_ids

        fail_file.write_text("1")
        try:
            rc, out = push(CKPT_ENGINE_BUCKET_BYTES="65536")
        finally:
            fail_file.unlink()
        assert rc != 0 and "injected failure in bucket 1" in out, out
        assert server.get("/health").status_code == 503

        rc, out = push(CKPT_ENGINE_BUCKET_BYTES="65536")
        assert rc == 0, out
        assert server.get("/health").status_code == 200
        assert server.post("/generate", body).json()["output_ids"] == hf_ids
    finally:
        server.stop()
