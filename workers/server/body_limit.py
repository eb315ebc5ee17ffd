"""Limits on request bodies: their size (`BodySizeLimit`, 413) and their JSON nesting
(`BoundedJsonRoute`, 400).

`BodySizeLimit`: ASGI middleware that caps the size of every request body (413 past it).

uvicorn has no such limit, and FastAPI reads and parses a JSON body on the event loop: an
unbounded body costs memory in proportion (a 300 MB body took the front to a 4 GiB peak) and
stalls every other request, `/health` included, while it is parsed. The cap (`--max-request-
bytes`) bounds both. A `Content-Length` over the cap is refused before any byte of the body is
read; a chunked body is counted as it arrives and refused as soon as it passes the cap. The
answer is `413 {"success": false, "message"}`, the shape of the server's other errors.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from ckpt_engine import json_depth
from workers.errors import RequestError

MAX_BODY_DEPTH = json_depth.MAX_DEPTH


class BoundedJsonRoute(APIRoute):
    """Every route's JSON body nests at most `MAX_BODY_DEPTH` levels: deeper, the answer is
    `400 {"success": false, "message"}` naming the path to the first container past the
    limit (e.g. `request body['slices']['layouts']['model.norm.weight']['inner']...`). FastAPI's
    own parse answers a body past the parser's limit with a bare "error parsing the body", and
    code that walks a parsed body recursively (`dataclasses.asdict` of the front's messages
    to the ranks, a layout parser) would die on a body the parser accepts. Checked before
    FastAPI parses it (the body is already read whole, under `BodySizeLimit`), and only when it
    holds more than 64 brackets (counted at C speed; else it cannot nest that deep and is parsed
    once, by FastAPI); a body that is not JSON is left to FastAPI (a 400 naming the position)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            body = await request.body()  # kept by the request: FastAPI reads it again
            if json_depth.may_exceed(body, MAX_BODY_DEPTH):  # else it cannot: parsed once
                try:
                    json_depth.loads(body, what="request body", max_depth=MAX_BODY_DEPTH)
                except json_depth.JsonDepthError as e:
                    raise RequestError(str(e)) from None
                except ValueError:
                    pass  # not JSON: FastAPI's answer names the position
            return await handler(request)

        return bounded


class BodySizeLimit:
    def __init__(self, app: Any, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, int(declared))
            return
        received, over, started = 0, False, False

        async def counted_receive() -> dict:
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True  # the app sees a disconnect; the 413 below answers instead
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if over:
                return  # whatever the app makes of the cut body, the 413 is the answer
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self._refuse(send, received)

    async def _refuse(self, send: Any, size: int) -> None:
        body = json.dumps(
            {
                "success": False,
                "message": f"request body of {size}+ bytes exceeds the server's limit of "
                f"{self.max_bytes} bytes (--max-request-bytes)",
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
