"""The HTTP service: a FastAPI app over one `Retriever`, and the web page that uses it.

The routes live in `lightningdot.serve.routes`, the threads and batching they share in
`lightningdot.serve.service`, who may change the index in `lightningdot.serve.security`; this
module puts them together with the middleware and the API docs.
"""

from __future__ import annotations

import contextlib
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from lightningdot import __version__
from lightningdot.config import ServeConfig
from lightningdot.errors import LightningDotError
from lightningdot.retrieval import Retriever
from lightningdot.serve.metrics import RequestMetrics
from lightningdot.serve.routes import (
    collection_routes,
    explain_routes,
    image_query_routes,
    image_routes,
    info_routes,
    query_routes,
)
from lightningdot.serve.security import WriteGuard, WritePolicy, is_write, write_policy
from lightningdot.serve.service import Service

# Swagger UI 5 and ReDoc 2 as the `fastapi-offline` package ships them: FastAPI's own /docs and
# /redoc load them (and fonts) from CDNs, blank without internet. (swagger-ui-bundle ships
# Swagger UI 4, which cannot read the OpenAPI 3.1 documents FastAPI writes.)
DOC_FILES = resources.files("fastapi_offline").joinpath("static")
DOC_ASSETS = "/docs-assets"


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


def user_errors(retriever: Retriever):
    """The handler of errors caused by the request (a bad image, a re-rank without a
    re-ranker): a 400 whose message names the server's folders by their roots' names, not by
    where they are on its disk."""

    async def user_error(request: Request, exc: LightningDotError) -> JSONResponse:
        detail = str(exc)
        for where, name in retriever.index.places().items():
            detail = detail.replace(where, name)
        return JSONResponse({"detail": detail}, status_code=400)

    return user_error


def offline_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc, their scripts and styles served by this app."""
    app.mount(DOC_ASSETS, StaticFiles(directory=str(DOC_FILES)), name="docs-assets")
    favicon = f"{DOC_ASSETS}/favicon.png"

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOC_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOC_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{favicon}",
            # Off: the validator badge is an image from swagger.io that is sent this spec's URL.
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOC_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{favicon}",
            with_google_fonts=False,
        )


KEY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}


def document_key(app: FastAPI) -> None:
    """Mark the write routes as needing the API key in /openapi.json, so /docs offers to send
    it ("Authorize"). (The key is checked by `WriteGuard`, not by the routes.)"""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()  # cached by FastAPI: this runs once
            schema.setdefault("components", {})["securitySchemes"] = KEY_SCHEMES
            for path, operations in schema["paths"].items():
                for method, operation in operations.items():
                    if isinstance(operation, dict) and is_write(method.upper(), path):
                        operation["security"] = [{name: []} for name in KEY_SCHEMES]
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(
    retriever: Retriever, cfg: ServeConfig | None = None, writes: WritePolicy | None = None
) -> FastAPI:
    """The service over `retriever`. Run it with uvicorn (`ldot serve`) or FastAPI's TestClient
    (as a context manager, so the model thread starts). `writes`: who may change the index (see
    `lightningdot.serve.security.write_policy`); by default that of a loopback bind without a
    key, so a caller that binds any other address must pass its own."""
    writes = writes or write_policy("127.0.0.1", None)
    service = Service(retriever, cfg or ServeConfig(), writes.mode)

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
        docs_url=None,  # offline_docs serves both, without a CDN
        redoc_url=None,
    )
    app.add_middleware(UploadLimit, max_bytes=service.cfg.max_upload_bytes)
    app.add_middleware(WriteGuard, policy=writes)  # outside UploadLimit: a 403/401 before a 413
    app.add_middleware(RequestMetrics, metrics=service.metrics)  # outermost: sees every reply
    app.add_exception_handler(LightningDotError, user_errors(retriever))
    routers = (info_routes, query_routes, image_query_routes, explain_routes, image_routes)
    for routes in (*routers, collection_routes):
        app.include_router(routes(service))
    offline_docs(app)
    if writes.api_key is not None:
        document_key(app)
    return app
