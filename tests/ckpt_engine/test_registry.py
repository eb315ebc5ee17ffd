"""The registry: records and the choice of a source (pure, tables), then against a real
redis-server on a free port: publication, expiry, two models apart, waiting (client first),
busy counts, heartbeats, documents, and refusals (wrong password, a gRPC URL)."""

from __future__ import annotations

import threading
import time

import pytest
from redis_testutil import start_redis

from ckpt_engine.errors import RegistryError
from ckpt_engine.registry.records import (
    RecordError,
    SourceRecord,
    Want,
    choose,
    digest,
    passed_over,
)
from ckpt_engine.registry.redis_store import Heartbeat, RedisRegistry, check_url, redact

NOW = 1_000_000.0
D = digest({"tensors": [["w", "float32", [2, 2]]]})


def rec(instance="a", **kw) -> SourceRecord:
    base = dict(model="m", instance=instance, digest=D, tp_size=2, ready=True, heartbeat_at=NOW)
    base["backends"] = {"transfer_engine": {"url": f"http://{instance}"}}
    return SourceRecord(**{**base, **kw})


WANT = Want(model="m", digest=D, tp_size=2, backends=("transfer_engine",))


# -- pure ----------------------------------------------------------------------------------------
def test_digest_is_canonical():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})


def test_record_round_trip():
    r = rec(weight_version="v3", generation=4)
    assert SourceRecord.from_json(r.to_json()) == r


@pytest.mark.parametrize(
    "text, error",
    [
        ("[]", "not a JSON object"),
        ("{", "not JSON"),
        (rec().to_json().replace('"tp_size": 2', '"tp_size": 0'), "tp_size"),
        (rec().to_json().replace('"ready": true', '"ready": "yes"'), "ready"),
        (rec().to_json().replace('"model": "m"', '"model": ""'), "model"),
        (rec().to_json().replace('"format": 1', '"format": 9'), "record format"),
        (rec().to_json().replace('"ttl_s": 10.0', '"ttl_s": 0'), "ttl_s"),
        (rec().to_json()[:-1] + ', "evil": 1}', "unknown fields"),
    ],
)
def test_record_rejects(text, error):
    with pytest.raises(RecordError, match=error):
        SourceRecord.from_json(text)


@pytest.mark.parametrize(
    "records, busy, exclude, order",
    [
        ([rec("a"), rec("b", tp_size=1)], {}, (), ["a", "b"]),  # same TP first
        ([rec("a", tp_size=1), rec("b")], {"b": 5}, (), ["b", "a"]),  # TP before busy
        ([rec("a"), rec("b")], {"a": 2, "b": 1}, (), ["b", "a"]),  # least busy
        ([rec("a", heartbeat_at=NOW - 1), rec("b")], {}, (), ["b", "a"]),  # freshest
        ([rec("a"), rec("b")], {}, ("a",), ["b"]),  # excluded (failed already)
        ([rec("a", ready=False), rec("b", digest="sha256:x")], {}, (), []),
        ([rec("a", heartbeat_at=NOW - 11)], {}, (), []),  # expired
        ([rec("a", backends={"nccl": {}})], {}, (), []),  # no backend the reader runs
        ([rec("a", model="other")], {}, (), []),
    ],
)
def test_choose(records, busy, exclude, order):
    got = choose(records, WANT, now=NOW, busy=busy, exclude=exclude)
    assert [r.instance for r in got] == order


def test_passed_over_says_why():
    records = [
        rec("a", ready=False),
        rec("b", digest="sha256:" + "0" * 64),
        rec("c", heartbeat_at=NOW - 30),
        rec("d", backends={"nccl": {}}),
        rec("e"),
    ]
    reasons = passed_over(records, WANT, now=NOW, exclude={"e"})
    assert reasons == [
        "a: not ready (loading or updating its weights)",
        f"b: other weights layout (digest sha256:{'0' * 12}..., want {D[:19]}...)",
        "c: heartbeat 30 s old (ttl 10 s)",
        "d: offers ['nccl'], need one of ['transfer_engine']",
        "e: failed already",
    ]


@pytest.mark.parametrize(
    "url", ["grpc://mx:8001", "mx-server:8001", "http://r:6379", "unix:///tmp/redis.sock"]
)
def test_only_redis_urls(url):
    with pytest.raises(RegistryError, match=r"only Redis is supported.*ModelExpress gRPC"):
        check_url(url)
    assert check_url("rediss://h:1/0") == "rediss://h:1/0"


def test_redact():
    assert redact("redis://:hunter2@h:1/0") == "redis://:***@h:1/0"
    assert redact("redis://u:hunter2@h/0") == "redis://u:***@h/0"
    assert redact("redis://h:1") == "redis://h:1"


# -- against a real redis-server -------------------------------------------------------------------
def test_publish_list_two_models_and_expiry(redis_server):
    reg = RedisRegistry(redis_server.url)
    odd = "org/model:v1*[x]"  # separators and glob characters stay inside the name
    reg.publish(rec("a", model=odd))
    reg.publish(rec("b", model="m"))
    reg.publish(rec("short", model="m", ttl_s=0.3, heartbeat_at=time.time()))
    assert [r.instance for r in reg.sources(odd)] == ["a"]
    assert {r.instance for r in reg.sources("m")} == {"b", "short"}
    assert reg.sources("org/model") == []
    deadline = time.monotonic() + 10
    while "short" in {r.instance for r in reg.sources("m")}:  # Redis expires the key
        assert time.monotonic() < deadline, "the record did not expire within 10 s"
        time.sleep(0.05)
    reg.withdraw("m", "b")
    assert reg.sources("m") == []
    reg.client.set("ckpt-engine:v1:src:m:bad", b"{not json")
    assert reg.sources("m") == []  # a malformed record is skipped (and logged)


def test_wait_for_a_source_published_later(redis_server):
    reg = RedisRegistry(redis_server.url)
    reg.publish(rec("updating", ready=False, heartbeat_at=time.time()))
    publisher = threading.Timer(
        0.5, lambda: RedisRegistry(redis_server.url).publish(rec("late", heartbeat_at=time.time()))
    )
    start = time.monotonic()
    publisher.start()
    try:
        # recheck_s is long: the waiter is woken by the publication, not by polling
        found = reg.wait_for(WANT, timeout_s=60, recheck_s=30)
    finally:
        publisher.join()
    assert [r.instance for r in found] == ["late"]
    assert time.monotonic() - start < 20


def test_wait_for_times_out_naming_each_source(redis_server):
    reg = RedisRegistry(redis_server.url)
    reg.publish(rec("busy-updating", ready=False, heartbeat_at=time.time()))
    with pytest.raises(RegistryError, match="busy-updating: not ready") as info:
        reg.wait_for(WANT, timeout_s=0.5)
    assert info.value.timed_out and "model 'm'" in str(info.value)
    with pytest.raises(RegistryError, match="none published"):
        reg.wait_for(Want("nothing", D, 1, ("transfer_engine",)), timeout_s=0.2)


def test_busy_counts_order_the_choice(redis_server):
    reg = RedisRegistry(redis_server.url)
    now = time.time()
    reg.publish(rec("a", heartbeat_at=now))
    reg.publish(rec("b", heartbeat_at=now))
    reg.acquire("m", "a", ttl_s=60)
    assert reg.busy("m", ["a", "b"]) == {"a": 1, "b": 0}
    assert [r.instance for r in reg.wait_for(WANT, timeout_s=5)] == ["b", "a"]
    reg.release("m", "a")
    assert reg.busy("m", ["a"]) == {"a": 0}


def test_heartbeat_keeps_a_record_alive_and_withdraws_it(redis_server):
    reg = RedisRegistry(redis_server.url)
    state = {"version": "v1", "ready": True}

    def make():
        return rec(
            "seed",
            ttl_s=0.6,
            heartbeat_at=time.time(),
            weight_version=state["version"],
            ready=state["ready"],
        )

    beat = Heartbeat(reg, make, interval_s=0.1)
    try:
        deadline = time.monotonic() + 1.5  # more than twice the ttl
        while time.monotonic() < deadline:
            assert [r.instance for r in reg.sources("m")] == ["seed"]
            time.sleep(0.05)
        state["version"] = "v2"
        beat.poke()
        deadline = time.monotonic() + 10
        while reg.sources("m")[0].weight_version != "v2":
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        beat.stop()
    assert reg.sources("m") == []


def test_documents(redis_server):
    reg = RedisRegistry(redis_server.url)
    threading.Timer(0.3, lambda: reg.put_document("metas/x", '{"a": 1}')).start()
    assert reg.wait_document("metas/x", timeout_s=30, recheck_s=30) == '{"a": 1}'
    assert reg.touch_document("metas/x", ttl_s=60)
    reg.delete_document("metas/x")
    assert reg.get_document("metas/x") is None
    with pytest.raises(RegistryError, match="no document 'metas/y'"):
        reg.wait_document("metas/y", timeout_s=0.2)


def test_wrong_password_is_refused_clearly(tmp_path):
    server = start_redis(tmp_path / "redis", password="right-password")
    try:
        assert RedisRegistry(server.url).sources("m") == []
        for url in (server.url_with("wrong-password"), f"redis://127.0.0.1:{server.port}/0"):
            with pytest.raises(RegistryError, match="refused") as info:
                RedisRegistry(url)
            assert "wrong-password" not in str(info.value) and "127.0.0.1" in str(info.value)
    finally:
        server.stop()
    with pytest.raises(RegistryError, match="cannot reach Redis"):
        RedisRegistry(f"redis://127.0.0.1:{server.port}/0", timeout_s=2)
