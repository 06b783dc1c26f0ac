"""The JSON shapes of the HTTP API (they also make its OpenAPI schema, `/openapi.json`)."""

from __future__ import annotations

from urllib.parse import quote

from pydantic import BaseModel, Field

from lightningdot.retrieval import Result


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
    # Not dict[str, float]: that turns max_k 100 into 100.0; the union keeps each number's type.
    limits: dict[str, int | float] = Field(description="The limits of `ServeConfig`.")
    writes: str = Field(
        description='Routes that change the index: "key" (they need the API key), "open" (to '
        'same-origin requests on loopback) or "off" (a non-loopback bind without a key).'
    )


class ErrorResponse(BaseModel):
    detail: str


ERRORS = {400: {"model": ErrorResponse}}


def image_url(image_id: str) -> str:
    return f"/images/{quote(image_id)}"


def to_hit(r: Result, image_id: str | None = None) -> Hit:
    """A result as the API returns it; `image_id`: whose image its URL shows (a caption's)."""
    return Hit(
        id=r.id,
        score=r.score,
        path=r.path,
        caption=r.caption,
        image_url=image_url(image_id or r.id),
    )
