"""Limits of the HTTP front, in process (no server): `BodySizeLimit` as an ASGI middleware
around a FastAPI route; JSON nesting on every POST route of the server's app
(`BoundedJsonRoute`); the cap on logits one /generate may return."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from workers.errors import RequestError
from workers.server.body_limit import MAX_BODY_DEPTH, BodySizeLimit
from workers.server.frontend import MAX_RETURNED_LOGITS, Frontend
from workers.server.http import create_app
from workers.server.schemas import GenerateRequest


class Body(BaseModel):
    ids: list[int]


def _app(limit: int) -> FastAPI:
    app = FastAPI()
    app.add_middleware(BodySizeLimit, max_bytes=limit)
    app.state.parsed = 0

    @app.post("/generate")
    async def generate(req: Body) -> dict:
        app.state.parsed += 1
        return {"n": len(req.ids)}

    return app


def _call(
    app, chunks: list[bytes], *, declared: int | None, path: str = "/generate"
) -> tuple[int, dict, int]:
    """POST `chunks` (Content-Length `declared`, or chunked): (status, body, chunks consumed)."""
    sent: list[dict] = []
    pending = list(chunks)

    async def receive() -> dict:
        if not pending:
            return {"type": "http.disconnect"}
        chunk = pending.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(b"content-type", b"application/json")]
    if declared is not None:
        headers.append((b"content-length", str(declared).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), len(chunks) - len(pending)


def test_a_body_within_the_limit_is_served():
    app = _app(1000)
    payload = json.dumps({"ids": [1, 2, 3]}).encode()
    assert _call(app, [payload], declared=len(payload))[:2] == (200, {"n": 3})


def test_a_declared_length_over_the_limit_is_refused_unread():
    app = _app(1000)
    status, body, consumed = _call(app, [b"x" * 600, b"x" * 600], declared=1200)
    assert status == 413 and consumed == 0 and app.state.parsed == 0
    assert "1200+ bytes exceeds the server's limit of 1000 bytes" in body["message"]


@pytest.mark.parametrize("chunks", [3, 50])
def test_a_chunked_body_is_cut_when_it_passes_the_limit(chunks):
    app = _app(1000)
    status, body, consumed = _call(app, [b"[" * 400] * chunks, declared=None)
    assert status == 413 and body["success"] is False and app.state.parsed == 0
    assert consumed == 3  # read up to the chunk that passed the limit, no further


def test_returned_logits_are_capped_before_any_rank_works():
    front = object.__new__(Frontend)  # no ranks: the request must be refused before them
    front.codec = None
    front.model = SimpleNamespace(
        vocab_size=150_000, max_position_embeddings=1 << 20, eos_token_ids=[]
    )
    tokens = MAX_RETURNED_LOGITS // 150_000 + 1
    req = GenerateRequest(input_ids=[1, 2], max_new_tokens=tokens, return_logits=True)
    with pytest.raises(RequestError, match=f"ask for at most {tokens - 1} new tokens"):
        asyncio.run(front._generate(req))


def _post_routes(app: FastAPI) -> list[str]:
    return sorted(r.path for r in app.routes if "POST" in getattr(r, "methods", ()))


@pytest.mark.parametrize("depth", [MAX_BODY_DEPTH + 1, 500, 20_000, 200_000])
def test_every_post_route_refuses_a_body_nested_past_the_limit_naming_where(depth):
    """Past 64 levels (within the parser's limit or past it): 400 naming the path, before the
    front is asked anything (it has nothing to answer with here)."""
    app = create_app(SimpleNamespace(), api_key=None, max_request_bytes=1 << 20)
    routes = _post_routes(app)
    assert "/init_weights_send_group_for_remote_instance" in routes and "/generate" in routes
    inner = "[" * (depth - 2) + "]" * (depth - 2)
    payload = ('{"slices": {"layouts": {"model.norm.weight": ' + inner + "}}}").encode()
    for path in routes:
        status, body, _ = _call(app, [payload], declared=len(payload), path=path)
        assert status == 400 and body["success"] is False, (path, body)
        where = "request body['slices']['layouts']['model.norm.weight'][0][0][0]..."
        said = f"JSON nested deeper than {MAX_BODY_DEPTH} levels"
        if depth < 1000:  # parsed, then walked: the path is named
            assert body["message"] == f"{where}: {said}", (path, body)
        else:  # past the parser's own limit
            assert body["message"] == f"request body: {said}", (path, body)


def test_a_body_within_the_depth_limit_reaches_validation():
    app = create_app(SimpleNamespace(), api_key=None, max_request_bytes=1 << 20)
    payload = json.dumps({"input_ids": [[[[1]]]]}).encode()
    status, body, _ = _call(app, [payload], declared=len(payload))
    assert status == 400 and body["message"].startswith("invalid request: input_ids"), body
