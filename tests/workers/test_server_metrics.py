"""End to end, observability: `GET /metrics` of the reference server (TP=2, CPU) read with the
Prometheus text parser before and after updates, and the updater's `--json-out` lines (one per
rank per update), for a refused HTTP update, a good update pushed by `torchrun
examples/update.py`, a generation, and an update the server refuses (a tensor missing)."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save_file
from workers_testutil import (
    KEY,
    PROMPT,
    checkpoint_state,
    make_hf_model,
    run_updater,
    save_checkpoint,
    start_server,
    wait_until_up,
)

pytestmark = pytest.mark.slow


def scrape(server) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of /metrics (no API key sent: the route needs none)."""
    r = server.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(m: dict, name: str, **labels: str) -> float | None:
    return m.get((name, frozenset(labels.items())))


def state(m: dict) -> str:
    (on,) = [dict(k[1])["ckpt_engine_serving_state"] for k, v in m.items() if k[0] == "ckpt_engine_serving_state" and v == 1]  # fmt: skip
    return on


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_and_json_lines_follow_updates(tmp_path):
    model = make_hf_model("qwen3")
    good = save_checkpoint(model, tmp_path / "good")
    tensors = checkpoint_state(model)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    bad = tmp_path / "bad"  # one tensor short: every rank refuses before writing
    bad.mkdir()
    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"}, bad / "m.safetensors")

    args = ["--tp", "2", "--device", "cpu", "--dtype", "float32", "--load-format", "dummy"]
    args += ["--wait-for-initial-weights", "--api-key", "secret", "--weight-version", "v0"]
    server = start_server(good, *args, log=tmp_path / "server.log")
    try:
        wait_until_up(server)
        m = scrape(server)
        assert state(m) == "waiting_for_initial_weights"
        assert value(m, "ckpt_engine_weight_version_info", version="v0") == 1
        assert ("ckpt_engine_seconds_since_last_good_update", frozenset()) not in m
        assert value(m, "ckpt_engine_update_duration_seconds_count") == 0

        # refused over HTTP (no socket for the ranks' devices): counted, nothing changes
        handles = {"zmq_handles": {"CPU-x-0": "ipc://x"}}
        assert server.post("/update_weights_from_ipc", handles, headers=KEY).status_code == 400
        m = scrape(server)
        method = "update_weights_from_ipc"
        assert value(m, "ckpt_engine_updates_started_total", method=method) == 1
        assert value(m, "ckpt_engine_updates_failed_total", method=method, cause="refused") == 1
        assert state(m) == "waiting_for_initial_weights"

        # a good update by the parameter server (2 ranks), with its JSON lines
        lines = tmp_path / "updates.jsonl"
        extra = ["--inference-api", method, "--weight-version", "v1", "--json-out", str(lines)]
        progress = {"CKPT_ENGINE_PROGRESS": "log", "CKPT_ENGINE_PROGRESS_INTERVAL_S": "1e-9"}
        rc, out = run_updater(server.url, good, *extra, nproc=2, device="cpu", env=progress)
        assert rc == 0, out
        # registration progress: plain lines (not a terminal), from rank 0 only
        assert "[update rank 0] INFO register 'my-checkpoint-iter-0': " in out
        assert "[update rank 1] INFO register 'my-checkpoint-iter-0': " not in out
        m = scrape(server)
        assert state(m) == "ready"
        assert value(m, "ckpt_engine_weight_version_info", version="v1") == 1
        assert value(m, "ckpt_engine_weight_version_info", version="v0") is None
        assert value(m, "ckpt_engine_updates_started_total", method=method) == 2
        assert value(m, "ckpt_engine_updates_succeeded_total", method=method) == 1
        assert value(m, "ckpt_engine_update_duration_seconds_count") == 1
        assert value(m, "ckpt_engine_update_bytes_count") == 1
        assert value(m, "ckpt_engine_update_bytes_sum") == nbytes
        assert 0 <= value(m, "ckpt_engine_seconds_since_last_good_update") < 120

        records = read_lines(lines)
        assert sorted(r["rank"] for r in records) == [0, 1]
        for r in records:
            assert r["schema"] == "ckpt-engine.update/v1" and r["result"] == "ok"
            assert r["error"] is None and r["world_size"] == 2 and r["weight_version"] == "v1"
            assert r["bytes"] == nbytes and r["tensors"] == len(tensors)
            assert r["buckets"] >= 1 and r["update_method"] == "broadcast"
            assert set(r["seconds"]) >= {"register", "ready", "gather", "update"}
            assert all(r["seconds"][k] <= r["slowest_seconds"][k] for k in r["seconds"])
            assert r["update_phases"] and r["endpoint"] == server.url
        assert sum(r["rank_bytes"] for r in records) >= nbytes

        # a generation
        assert server.post("/generate", {"input_ids": PROMPT}).status_code == 200
        m = scrape(server)
        assert value(m, "ckpt_engine_generate_requests_total", result="ok") == 1
        assert value(m, "ckpt_engine_generate_latency_seconds_count") == 1

        # an update the server refuses: failed lines on every rank, the weights stay servable
        rc, out = run_updater(server.url, bad, *extra[:2], "--json-out", str(lines), nproc=2, device="cpu")  # fmt: skip
        assert rc == 1, out
        failed = read_lines(lines)[2:]
        assert sorted(r["rank"] for r in failed) == [0, 1]
        for r in failed:
            assert r["result"] == "failed" and "model.norm.weight" in r["error"]
            assert "update" in r["seconds"] and r["bytes"] is None
        m = scrape(server)
        assert value(m, "ckpt_engine_updates_failed_total", method=method, cause="refused") == 2
        assert value(m, "ckpt_engine_updates_succeeded_total", method=method) == 1
        assert state(m) == "ready"
        assert value(m, "ckpt_engine_weight_version_info", version="v1") == 1
    finally:
        server.stop()
