"""The HTTP service: a FastAPI app over one `Retriever`, and the web page that uses it.

The routes live in `lightningdot.serve.routes`, the threads and batching they share in
`lightningdot.serve.service`; this module puts them together with the middleware.
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from lightningdot import __version__
from lightningdot.config import ServeConfig
from lightningdot.errors import LightningDotError
from lightningdot.retrieval import Retriever
from lightningdot.serve.metrics import RequestMetrics
from lightningdot.serve.routes import image_routes, info_routes, query_routes
from lightningdot.serve.service import Service


class UploadLimit:
    """ASGI middleware: a body whose declared length is over the limit gets a 413 that names
    the limit, before any of it is read. (Bodies sent without a length are cut off by the
    routes' own `max_body_size`.)"""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"0")
            if length.isdigit() and int(length) > self.max_bytes:
                limit = self.max_bytes / 2**20
                detail = f"the request body is {int(length)} bytes; the limit is {limit:g} MB"
                await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def user_error(request: Request, exc: LightningDotError) -> JSONResponse:
    """Errors caused by the request (a bad image, a re-rank without a re-ranker): a 400."""
    return JSONResponse({"detail": str(exc)}, status_code=400)


def create_app(retriever: Retriever, cfg: ServeConfig | None = None) -> FastAPI:
    """The service over `retriever`. Run it with uvicorn (`ldot serve`) or FastAPI's TestClient
    (as a context manager, so the model thread starts)."""
    service = Service(retriever, cfg or ServeConfig())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="lightningdot",
        summary="Real-time image-text retrieval with LightningDOT.",
        version=__version__,
        lifespan=lifespan,
        form_limits={"max_files": service.cfg.max_files},
    )
    app.add_middleware(UploadLimit, max_bytes=service.cfg.max_upload_bytes)
    app.add_middleware(RequestMetrics, metrics=service.metrics)  # outermost: sees every reply
    app.add_exception_handler(LightningDotError, user_error)
    for routes in (info_routes, query_routes, image_routes):
        app.include_router(routes(service))
    return app
