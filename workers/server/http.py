"""The HTTP front: FastAPI routes over `Frontend`, and the one place where errors become statuses.

| route                          | key | answers                                                   |
| GET  /ping                     |     | 200 always (the front process is alive)                   |
| GET  /health                   |     | 200 weights servable and every rank alive; 503 otherwise  |
|                                |     | (probes ranks that timed out: bounded, see frontend.py)   |
| POST /generate                 |     | 200 greedy tokens (+ text); 503 without servable weights  |
| POST /collective_rpc           | yes | 200 {success, results: [per rank]}; 400 method not allowed|
| POST /update_weights_from_ipc  | yes | 200 / 400 {success, message}                              |
| GET  /weights_info             | yes | 200 {weight_version, status, checksum, tensors} (cached   |
|                                |     | per weight change: the model is hashed once per version)  |
| GET  /metrics                  |     | Prometheus text (metrics.py): counters of the front, no   |
|                                |     | lock, no rank call, no hashing                            |
| remote-instance (fork) seed routes: `workers.remote_instance.routes`                        |

Errors: 400 bad request (a JSON body nested past 64 levels included, naming where: `body_limit.py`)
or a failed weight update, 401 missing/wrong API key, 413 a body over
`--max-request-bytes` (`body_limit.py`: refused before it is read or parsed), 503 not servable or
a dead rank, 504 a rank timed out, 500 anything else. Bodies are {"success": false, "message"}.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from workers.errors import (
    NotReadyError,
    RankDeadError,
    RankError,
    RankTimeoutError,
    RequestError,
    WorkersError,
)
from workers.server.body_limit import BodySizeLimit, BoundedJsonRoute
from workers.server.frontend import Frontend
from workers.server.metrics import CONTENT_TYPE
from workers.server.schemas import (
    CollectiveRpcRequest,
    GenerateRequest,
    UpdateWeightsFromIpcRequest,
)

logger = logging.getLogger(__name__)


class AuthError(WorkersError):
    pass


def _fail(status: int, message: str) -> JSONResponse:
    return JSONResponse({"success": False, "message": message}, status_code=status)


def status_of(e: Exception) -> int:
    if isinstance(e, AuthError):
        return 401
    if isinstance(e, RequestError):
        return 400
    if isinstance(e, NotReadyError | RankDeadError):
        return 503
    if isinstance(e, RankTimeoutError):
        return 504
    return 500


def create_app(
    front: Frontend, *, api_key: str | None, max_request_bytes: int = 16 << 20
) -> FastAPI:
    app = FastAPI(title="ckpt-engine reference server")
    app.router.route_class = BoundedJsonRoute  # every route below: JSON nesting bounded
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)

    def require_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise AuthError("missing or wrong API key (Authorization: Bearer <key>)")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in err['loc'][1:]) or 'body'}: {err['msg']}"
            for err in exc.errors()
        ]
        return _fail(400, "invalid request: " + "; ".join(problems))

    @app.exception_handler(WorkersError)
    async def _workers_error(request: Request, exc: WorkersError) -> JSONResponse:
        status = status_of(exc)
        if status >= 500:
            logger.error("%s %s: %s", request.method, request.url.path, exc)
        return _fail(status, str(exc))

    @app.get("/ping")
    async def ping() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(front.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok, body = await front.health()
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.post("/generate")
    async def generate(req: GenerateRequest) -> dict:
        return await front.generate(req)

    @app.post("/collective_rpc", dependencies=[Depends(require_key)])
    async def collective_rpc(req: CollectiveRpcRequest) -> JSONResponse:
        try:
            results = await front.collective_rpc(req.method, req.args, req.kwargs, req.timeout)
        except RankError as e:
            if isinstance(e, RankDeadError | RankTimeoutError):
                raise  # 503 / 504: the server's state, not the call's
            return _fail(400, str(e))  # the method ran and failed: the caller's to handle
        return JSONResponse({"success": True, "results": results})

    @app.post("/update_weights_from_ipc", dependencies=[Depends(require_key)])
    async def update_weights_from_ipc(req: UpdateWeightsFromIpcRequest) -> JSONResponse:
        try:
            message = await front.update_weights_from_ipc(req.zmq_handles, req.weight_version)
        except RankError as e:
            return _fail(400, str(e))
        return JSONResponse({"success": True, "message": message})

    @app.get("/weights_info", dependencies=[Depends(require_key)])
    async def weights_info() -> dict:
        return await front.weights_info()

    from workers.remote_instance.routes import add_seed_routes

    add_seed_routes(app, front, require_key)
    return app
