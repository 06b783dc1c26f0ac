"""The routes, grouped by what they serve; each group closes over the service and its limits.

    GET  /search           text -> images
    POST /search/image     image -> captions, and similar images
    POST /images           add images to the index while it serves
    DELETE /images/{id}    delete an image (and its captions) from the index
    PATCH  /images/{id}    set or remove fields of an image
    GET  /images/{id}      an indexed image, or its thumbnail (?size=N)
    GET  /images/{id}/explain?q=...   the image with a heat map of what matched the query
    GET  /  /healthz  /metrics   the web page, what is loaded, Prometheus text

The routes own no model logic: they read the request, call the `Retriever` through the
service, and shape the answer.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at run time, and
# they refer to the local `cfg`.
import functools
import io
import time
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lightningdot.errors import LightningDotError
from lightningdot.features import load_image
from lightningdot.heatmap import overlay_png
from lightningdot.index.filters import parse_filter
from lightningdot.model.coverage import reads_many_languages
from lightningdot.retrieval import ImageAnswer, Page, Retriever, check_query
from lightningdot.serve.schemas import (
    ERRORS,
    AddedImage,
    AddResponse,
    DeleteResponse,
    ErrorResponse,
    FieldsResponse,
    FieldsUpdate,
    Health,
    ImageSearchResponse,
    SearchResponse,
    image_url,
    to_hit,
)
from lightningdot.serve.service import Service, TextQuery

PAGE = resources.files("lightningdot.serve").joinpath("static/index.html")
NO_RERANKER = "this server has no re-ranker (start it with --reranker)"


async def read_upload(f: UploadFile) -> tuple[str, bytes]:
    data = await f.read()
    name = f.filename or "upload"
    if not data:
        raise HTTPException(400, f"{name}: the uploaded file is empty")
    return name, data


def query_routes(service: Service) -> APIRouter:
    """Text queries."""
    router, cfg, retriever = APIRouter(), service.cfg, service.retriever

    @router.get("/search", response_model=SearchResponse, responses=ERRORS)
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
        explain: Annotated[
            bool, Query(description="Add each result's region weights (`regions`).")
        ] = False,
        filter: Annotated[str | None, Query(description=FILTER_HELP)] = None,
        offset: Annotated[
            int, Query(ge=0, le=cfg.max_offset, description="Results to skip (paging).")
        ] = 0,
        min_score: Annotated[float | None, Query(description="Lowest score returned.")] = None,
    ) -> SearchResponse:
        """Text -> images: the indexed images that best match the query."""
        if not q.strip():
            raise HTTPException(400, "the query is empty")
        check_query(k, rerank, retriever.reranker, NO_RERANKER)  # before it waits in the queue
        page = checked_page(retriever, filter, offset, min_score, k, rerank)
        answer = await service.search_text(TextQuery(q, k, rerank, explain, page))
        service.metrics.observe("/search", answer.timing_ms)
        results = [to_hit(r) for r in answer.results]
        return SearchResponse(
            query=q, results=results, timing_ms=answer.timing_ms, warnings=answer.warnings
        )

    return router


def image_query_routes(service: Service) -> APIRouter:
    """Image queries."""
    router, cfg, retriever = APIRouter(), service.cfg, service.retriever

    @router.post(
        "/search/image",
        response_model=ImageSearchResponse,
        responses=ERRORS,
        max_body_size=cfg.max_upload_bytes,
    )
    async def search_image(
        file: Annotated[UploadFile, File(description="The query image.")],
        k: Annotated[int, Form(ge=1, le=cfg.max_k)] = 10,
        rerank: Annotated[int, Form(ge=0, le=cfg.max_rerank)] = 0,
        explain: Annotated[bool, Form(description="Add each caption's token weights.")] = False,
        filter: Annotated[str | None, Form(description=FILTER_HELP)] = None,
        offset: Annotated[int, Form(ge=0, le=cfg.max_offset)] = 0,
        min_score: Annotated[float | None, Form()] = None,
    ) -> ImageSearchResponse:
        """Image -> the captions that describe it and the indexed images that look like it."""
        name, data = await read_upload(file)
        check_query(k, rerank, retriever.reranker, NO_RERANKER)
        page = checked_page(retriever, filter, offset, min_score, k, rerank)
        has_captions = retriever.caption_index is not None
        if rerank and not has_captions:
            raise HTTPException(400, "re-ranking needs a caption index, and this index has none")
        received = time.perf_counter()

        def work() -> ImageAnswer:
            image = load_image(data, name=name)  # its errors name the upload
            targets = ("captions", "images") if has_captions else ("images",)
            found = retriever.search_image_all(
                [image], k, rerank, targets, [received], explain, page
            )
            return found[0]

        answer = await service.on_model_thread(work)
        service.metrics.observe("/search/image", answer.timing_ms)
        return ImageSearchResponse(
            captions=[to_hit(r, r.path) for r in answer.captions or []],
            images=[to_hit(r) for r in answer.images],
            timing_ms=answer.timing_ms,
        )

    return router


FILTER_HELP = (
    'Only items whose fields pass this JSON filter, e.g. {"folder": {"prefix": "trips/"}, '
    '"taken": {"gte": "2024-01-01"}} (README, "Filters").'
)


def checked_page(
    retriever: Retriever, spec: str | None, offset: int, min_score, k: int, rerank: int
) -> Page:
    """The page a query asks for, checked before the query waits in the queue (an error
    inside a batch would fail the queries beside it): a 400 when it cannot be given."""
    page = Page(spec or None, offset, min_score)
    page.check(k, rerank)
    if spec:
        parse_filter(spec, retriever.image_index.kinds)
    return page


@functools.lru_cache(maxsize=1024)
def thumbnail(path: str, size: int, mtime: float) -> bytes:
    """A JPEG no larger than `size` on either side (cached; `mtime` keys out stale files)."""
    image = load_image(path)
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def indexed_file(retriever: Retriever, image_id: str) -> Path:
    """The file of an indexed image (404 when the image or its file is not there)."""
    item = retriever.image_index.get(image_id)
    if item is None:
        raise HTTPException(404, f"no image {image_id!r} in the index")
    path = retriever.image_file(item)
    if not path.is_file():
        raise HTTPException(404, f"the file of image {image_id!r} is missing: {path.name}")
    return path


def explain_routes(service: Service) -> APIRouter:
    """Why an image matched a query, drawn over it. Included before `image_routes`, whose
    `/images/{id}` would take the `/explain` into the id."""
    router, cfg, retriever = APIRouter(), service.cfg, service.retriever

    @router.get(
        "/images/{image_id:path}/explain",
        responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorResponse}},
        response_class=Response,
    )
    async def explain_image(
        image_id: str,
        q: Annotated[str, Query(min_length=1, max_length=cfg.max_query_chars)],
        rerank: Annotated[
            bool, Query(description="Explain the re-ranked score, not the dot product.")
        ] = False,
    ) -> Response:
        """A PNG of the image with a heat map of the regions that matched the query."""
        if not q.strip():
            raise HTTPException(400, "the query is empty")
        if rerank and retriever.reranker is None:
            raise HTTPException(400, NO_RERANKER)
        path = indexed_file(retriever, image_id)

        def work() -> bytes:
            weights = retriever.explain(q, image_id, rerank)
            return overlay_png(load_image(path), weights)

        try:
            body = await service.on_model_thread(work)
        except LightningDotError as e:
            raise HTTPException(404, f"cannot explain image {image_id!r}: {e}") from e
        return Response(body, media_type="image/png", headers={"X-Content-Type-Options": "nosniff"})

    return router


def image_routes(service: Service) -> APIRouter:
    """Adding images, and reading them back."""
    router, cfg, retriever = APIRouter(), service.cfg, service.retriever

    @router.post(
        "/images", response_model=AddResponse, responses=ERRORS, max_body_size=cfg.max_upload_bytes
    )
    async def add_images(
        files: Annotated[list[UploadFile], File(description="One or more image files.")],
    ) -> AddResponse:
        """Add images to the index. All or nothing: one file that does not decode adds none."""
        uploads = [await read_upload(f) for f in files]
        received = time.perf_counter()
        added = await service.on_add_thread(retriever.add_uploads, uploads, received)
        service.metrics.observe("/images", added.timing_ms)
        return AddResponse(
            images=[
                AddedImage(id=i, filename=name, added=new, image_url=image_url(i))
                for (name, _), (i, new) in zip(uploads, added.images, strict=True)
            ],
            count=retriever.image_index.count,
            timing_ms=added.timing_ms,
        )

    @router.get(
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
        path = indexed_file(retriever, image_id)
        # Browsers must not guess a type other than the one sent (an upload is never a page).
        headers = {"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"}
        if size == 0:
            return FileResponse(path, headers=headers)
        try:
            body = thumbnail(str(path), size, path.stat().st_mtime)
        except LightningDotError as e:
            raise HTTPException(404, f"image {image_id!r} does not decode: {e}") from e
        return Response(body, media_type="image/jpeg", headers=headers)

    return router


def collection_routes(service: Service) -> APIRouter:
    """Deleting images and changing their fields."""
    router, retriever = APIRouter(), service.retriever

    @router.delete(
        "/images/{image_id:path}",
        response_model=DeleteResponse,
        responses={404: {"model": ErrorResponse}, **ERRORS},
    )
    async def delete_image(image_id: str) -> DeleteResponse:
        """Delete an image and its captions from the index (an upload's file too)."""
        if retriever.image_index.get(image_id) is None:
            raise HTTPException(404, f"no image {image_id!r} in the index")
        await service.on_add_thread(retriever.delete, [image_id])
        return DeleteResponse(deleted=image_id, count=retriever.image_index.count)

    @router.patch(
        "/images/{image_id:path}",
        response_model=FieldsResponse,
        responses={404: {"model": ErrorResponse}, **ERRORS},
    )
    async def update_fields(image_id: str, update: FieldsUpdate) -> FieldsResponse:
        """Set or remove fields of an image, which filters then read."""
        if retriever.image_index.get(image_id) is None:
            raise HTTPException(404, f"no image {image_id!r} in the index")
        fields = await service.on_add_thread(retriever.update_fields, image_id, update.fields)
        return FieldsResponse(id=image_id, fields=fields)

    return router


def info_routes(service: Service) -> APIRouter:
    """The web page, health and metrics."""
    router, retriever = APIRouter(), service.retriever
    page = PAGE.read_text(encoding="utf-8")

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index_page() -> HTMLResponse:
        return HTMLResponse(page)

    @router.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        """Liveness, what is loaded, and the limits requests must respect."""
        captions = retriever.caption_index
        return Health(
            status="ok",
            model_id=retriever.image_index.model_id,
            images=retriever.image_index.count,
            captions=captions.count if captions is not None else 0,
            reranker=retriever.reranker is not None,
            multilingual=reads_many_languages(retriever.model.cfg.text),
            limits=asdict(service.cfg),
            writes=service.writes,
        )

    @router.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        """Prometheus text format."""
        body = generate_latest(service.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return router
