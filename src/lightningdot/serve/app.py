"""The HTTP service: a FastAPI app over one `Retriever`, and the web page that uses it.

    GET  /                 the web page
    GET  /search           text -> images
    POST /search/image     image -> captions, and similar images
    POST /images           add images to the index while it serves
    GET  /images/{id}      an indexed image, or its thumbnail (?size=N)
    GET  /healthz          what is loaded, and the service's limits
    GET  /metrics          Prometheus text: requests by route and status, latency per stage

The app owns no model logic: it validates input, calls the `Retriever` and times it. One
thread answers queries: text queries that arrive together are encoded as one batch
(`MicroBatcher`), and image queries run there too. Adds encode their images on a second
thread, so a long add never holds queries up (it shares the CPU with them), and swap the grown
index in once it is saved (`Retriever.append`).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at run time, and
# they refer to the local `cfg`.
import asyncio
import contextlib
import functools
import io
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Annotated
from urllib.parse import quote

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lightningdot import __version__
from lightningdot.config import ServeConfig
from lightningdot.errors import LightningDotError
from lightningdot.features import load_image
from lightningdot.retrieval import Answer, Result, Retriever
from lightningdot.serve.batching import MicroBatcher

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Hit(BaseModel):
    id: str = Field(description="Image id, or caption id (`<image id>#<n>`).")
    score: float = Field(description="Dot product, or the re-ranked score when re-ranking.")
    path: str | None = Field(None, description="Image file (of the caption's image for captions).")
    caption: str | None = Field(None, description="The caption, or the image's first caption.")
    image_url: str | None = Field(None, description="URL of the image, from `GET /images/{id}`.")


STAGES = "`queue` (waiting for the model), `encode`, `search`, `rerank` (when asked) and `total`"


class SearchResponse(BaseModel):
    query: str
    results: list[Hit]
    timing_ms: dict[str, float] = Field(description=f"Milliseconds per stage: {STAGES}.")


class ImageSearchResponse(BaseModel):
    captions: list[Hit] = Field(description="Captions of the index, best first (image->text).")
    images: list[Hit] = Field(description="Similar images of the index, best first.")
    timing_ms: dict[str, float] = Field(description=f"Milliseconds per stage: {STAGES}.")


class AddedImage(BaseModel):
    id: str
    filename: str
    added: bool = Field(description="False when the same image was already indexed.")
    image_url: str


class AddResponse(BaseModel):
    images: list[AddedImage]
    count: int = Field(description="Images in the index after the add.")
    timing_ms: dict[str, float]


class Health(BaseModel):
    status: str
    model_id: str
    images: int
    captions: int
    reranker: bool
    limits: dict[str, float]


class ErrorResponse(BaseModel):
    detail: str


ERRORS = {400: {"model": ErrorResponse}}


@dataclass
class TextQuery:
    text: str
    k: int
    rerank: int


def answer_texts(retriever: Retriever, queries: list[TextQuery]) -> list[Answer]:
    """Answer a batch of text queries with one encode per re-rank depth present in it."""
    out: list[Answer | None] = [None] * len(queries)
    for depth in sorted({q.rerank for q in queries}):
        idx = [i for i, q in enumerate(queries) if q.rerank == depth]
        k = max(queries[i].k for i in idx)
        answers = retriever.search_text([queries[i].text for i in idx], k, depth)
        for i, a in zip(idx, answers, strict=True):
            a.results = a.results[: queries[i].k]
            out[i] = a
    return out  # type: ignore[return-value]


class Metrics:
    """Prometheus series of one app (its own registry, so several apps can live in a process)."""

    def __init__(self, retriever: Retriever) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ldot_requests",
            "HTTP requests by route template, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ldot_request_seconds",
            "Time to answer an HTTP request, by route template.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stages = Histogram(
            "ldot_stage_seconds",
            "Time per query in each stage: queue, encode, search, rerank, total.",
            ["route", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch = Histogram(
            "ldot_text_batch_size",
            "Text queries encoded together in one forward pass.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        items = Gauge("ldot_index_items", "Items in each index.", ["index"], registry=self.registry)
        items.labels("images").set_function(lambda: len(retriever.images))
        items.labels("captions").set_function(
            lambda: len(retriever.captions) if retriever.captions is not None else 0
        )

    def observe(self, route: str, timing_ms: dict[str, float]) -> None:
        for stage, ms in timing_ms.items():
            self.stages.labels(route, stage).observe(ms / 1e3)


class RequestMetrics:
    """ASGI middleware: counts and times every request, unknown routes and 4xx included."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            # The route template, not the raw path, keeps the label set small.
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


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


def image_url(image_id: str) -> str:
    return f"/images/{quote(image_id)}"


def to_hit(r: Result, image_id: str | None = None) -> Hit:
    return Hit(
        id=r.id,
        score=r.score,
        path=r.path,
        caption=r.caption,
        image_url=image_url(image_id or r.id),
    )


def with_queue(answer: Answer, start: float) -> dict[str, float]:
    """The answer's stage times, plus the time it waited and the request's wall time."""
    wall = 1e3 * (time.perf_counter() - start)
    timing = {k: v for k, v in answer.timing_ms.items() if k != "total"}
    return {"queue": max(0.0, wall - answer.timing_ms["total"]), **timing, "total": wall}


@functools.lru_cache(maxsize=1024)
def thumbnail(path: str, size: int, mtime: float) -> bytes:
    """A JPEG no larger than `size` on either side (cached; `mtime` keys out stale files)."""
    image = load_image(path)
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85)
    return buf.getvalue()


PAGE = resources.files("lightningdot.serve").joinpath("static/index.html")


def create_app(retriever: Retriever, cfg: ServeConfig | None = None) -> FastAPI:
    """The service over `retriever`. Run it with uvicorn (`ldot serve`) or FastAPI's TestClient
    (as a context manager, so the model thread starts)."""
    cfg = cfg or ServeConfig()
    metrics = Metrics(retriever)
    # One thread for the model, one for adds; created per run of the app's lifespan.
    pools: dict[str, ThreadPoolExecutor] = {}
    batcher: MicroBatcher[TextQuery, Answer] | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal batcher
        pools["model"] = ThreadPoolExecutor(1, thread_name_prefix="ldot-model")
        pools["add"] = ThreadPoolExecutor(1, thread_name_prefix="ldot-add")
        batcher = MicroBatcher(
            functools.partial(answer_texts, retriever),
            pools["model"],
            cfg.max_batch,
            on_batch=metrics.batch.observe,
        )
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            for pool in pools.values():
                pool.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(
        title="lightningdot",
        summary="Real-time image-text retrieval with LightningDOT.",
        version=__version__,
        lifespan=lifespan,
        form_limits={"max_files": cfg.max_files},
    )
    app.add_middleware(UploadLimit, max_bytes=cfg.max_upload_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # added last: outermost, sees every reply
    page = PAGE.read_text(encoding="utf-8")

    @app.exception_handler(LightningDotError)
    async def user_error(request: Request, exc: LightningDotError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    def check_rerank(rerank: int, k: int) -> None:
        if rerank and retriever.reranker is None:
            raise HTTPException(400, "this server has no re-ranker (start it with --reranker)")
        if 0 < rerank < k:
            # Re-ranking answers from the K it re-scores; past them the scores would not compare.
            raise HTTPException(400, f"rerank ({rerank}) must be 0 or at least k ({k})")

    async def run_model(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pools["model"], fn, *args)

    async def read_upload(f: UploadFile) -> tuple[str, bytes]:
        data = await f.read()
        name = f.filename or "upload"
        if not data:
            raise HTTPException(400, f"{name}: the uploaded file is empty")
        return name, data

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/search", response_model=SearchResponse, responses=ERRORS)
    async def search(
        q: Annotated[
            str,
            Query(min_length=1, max_length=cfg.max_query_chars, description="The text query."),
        ],
        k: Annotated[int, Query(ge=1, le=cfg.max_k, description="Results to return.")] = 10,
        rerank: Annotated[
            int,
            Query(ge=0, le=cfg.max_rerank, description="Re-rank the top K (0: off)."),
        ] = 0,
    ) -> SearchResponse:
        """Text -> images: the indexed images that best match the query."""
        if not q.strip():
            raise HTTPException(400, "the query is empty")
        check_rerank(rerank, k)
        start = time.perf_counter()
        answer = await batcher(TextQuery(q, k, rerank))
        timing = with_queue(answer, start)
        metrics.observe("/search", timing)
        return SearchResponse(
            query=q, results=[to_hit(r) for r in answer.results], timing_ms=timing
        )

    @app.post(
        "/search/image",
        response_model=ImageSearchResponse,
        responses=ERRORS,
        max_body_size=cfg.max_upload_bytes,
    )
    async def search_image(
        file: Annotated[UploadFile, File(description="The query image.")],
        k: Annotated[int, Form(ge=1, le=cfg.max_k)] = 10,
        rerank: Annotated[int, Form(ge=0, le=cfg.max_rerank)] = 0,
    ) -> ImageSearchResponse:
        """Image -> the captions that describe it and the indexed images that look like it."""
        name, data = await read_upload(file)
        check_rerank(rerank, k)
        has_captions = retriever.captions is not None
        if rerank and not has_captions:
            raise HTTPException(400, "re-ranking needs a caption index, and this index has none")
        start = time.perf_counter()

        def work() -> dict[str, list[Answer]]:
            try:
                image = load_image(data)
            except LightningDotError as e:
                raise LightningDotError(f"{name}: not an image this server can decode") from e
            targets = ("captions", "images") if has_captions else ("images",)
            return retriever.search_image_all([image], k, rerank, targets)

        answers = await run_model(work)
        captions = answers["captions"][0] if has_captions else None
        images = answers["images"][0]
        # The image is encoded once for both searches; their search times add up.
        stages = {
            "encode": images.timing_ms["encode"],
            "search": sum(a[0].timing_ms["search"] for a in answers.values()),
        }
        if captions is not None and "rerank" in captions.timing_ms:
            stages["rerank"] = captions.timing_ms["rerank"]
        timing = with_queue(Answer([], {**stages, "total": sum(stages.values())}), start)
        metrics.observe("/search/image", timing)
        return ImageSearchResponse(
            captions=[to_hit(r, r.path) for r in captions.results] if captions else [],
            images=[to_hit(r) for r in images.results],
            timing_ms=timing,
        )

    @app.post(
        "/images", response_model=AddResponse, responses=ERRORS, max_body_size=cfg.max_upload_bytes
    )
    async def add_images(
        files: Annotated[list[UploadFile], File(description="One or more image files.")],
    ) -> AddResponse:
        """Add images to the index. All or nothing: one file that does not decode adds none."""
        uploads = [await read_upload(f) for f in files]
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        added = await loop.run_in_executor(pools["add"], retriever.add_uploads, uploads)
        timing = {"total": 1e3 * (time.perf_counter() - start)}
        metrics.observe("/images", timing)
        return AddResponse(
            images=[
                AddedImage(id=i, filename=name, added=new, image_url=image_url(i))
                for (name, _), (i, new) in zip(uploads, added, strict=True)
            ],
            count=len(retriever.images),
            timing_ms=timing,
        )

    @app.get(
        "/images/{image_id:path}",
        responses={200: {"content": {"image/*": {}}}, 404: {"model": ErrorResponse}},
        response_class=Response,
    )
    def get_image(
        image_id: str,
        size: Annotated[
            int, Query(ge=0, le=1024, description="Thumbnail's longest side; 0: the file.")
        ] = 0,
    ) -> Response:
        """An indexed image: its file, or a JPEG thumbnail."""
        index = retriever.images
        row = index.row(image_id)
        if row is None:
            raise HTTPException(404, f"no image {image_id!r} in the index")
        path = retriever.image_file(index.items[row].get("path") or image_id)
        if not path.is_file():
            raise HTTPException(404, f"the file of image {image_id!r} is missing: {path.name}")
        # Browsers must not guess a type other than the one sent (an upload is never a page).
        headers = {"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"}
        if size == 0:
            return FileResponse(path, headers=headers)
        try:
            body = thumbnail(str(path), size, path.stat().st_mtime)
        except LightningDotError as e:
            raise HTTPException(404, f"image {image_id!r} does not decode: {e}") from e
        return Response(body, media_type="image/jpeg", headers=headers)

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        """Liveness, what is loaded, and the limits requests must respect."""
        return Health(
            status="ok",
            model_id=retriever.images.model_id,
            images=len(retriever.images),
            captions=len(retriever.captions) if retriever.captions is not None else 0,
            reranker=retriever.reranker is not None,
            limits=asdict(cfg),
        )

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
