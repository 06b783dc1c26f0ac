"""The JSON shapes of the HTTP API (they also make its OpenAPI schema, `/openapi.json`)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, Field

from lightningdot.retrieval import Result


class Regions(BaseModel):
    """Why an image matched (`explain=1`): its regions and what each did for the score."""

    boxes: list[list[float]] = Field(description="Each region's x1, y1, x2, y2, normalised.")
    weights: list[float] = Field(description="Each region's weight: higher, more of the match.")
    method: str = Field(
        description='"deletion-gradient": the score the region would take away if deleted, to '
        'first order; "state-similarity": its state\'s cosine with the query.'
    )


class Tokens(BaseModel):
    """Why a caption matched an image query (`explain=1`): its tokens' shares of the score."""

    tokens: list[str]
    weights: list[float] = Field(description="Each token's share of the dot product.")


class Hit(BaseModel):
    id: str = Field(description="Image id, or caption id (`<image id>#<n>`).")
    score: float = Field(description="Dot product, or the re-ranked score when re-ranking.")
    path: str | None = Field(None, description="Image file (of the caption's image for captions).")
    caption: str | None = Field(None, description="The caption, or the image's first caption.")
    image_url: str | None = Field(None, description="URL of the image, from `GET /images/{id}`.")
    regions: Regions | None = Field(None, description="With `explain=1`, on image results.")
    tokens: Tokens | None = Field(None, description="With `explain=1`, on caption results.")


STAGES = "`queue` (waiting for the model), `encode`, `search`, `rerank` (when asked) and `total`"


class SearchResponse(BaseModel):
    query: str
    results: list[Hit]
    timing_ms: dict[str, float] = Field(description=f"Milliseconds per stage: {STAGES}.")
    warnings: list[str] = Field(
        default_factory=list,
        description="How the model read the query, when its results may mean little: a "
        "script outside the vocabulary, or another language than an English model reads.",
    )


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


class DeleteResponse(BaseModel):
    deleted: str
    count: int = Field(description="Images in the index after the delete.")


class FieldsUpdate(BaseModel):
    fields: dict[str, Any] = Field(
        description="Fields to set (text or numbers); null removes one.",
        examples=[{"stock": 3, "label": "sale"}],
    )


class FieldsResponse(BaseModel):
    id: str
    fields: dict[str, Any] = Field(description="The image's fields after the update.")


class Health(BaseModel):
    status: str
    model_id: str
    images: int
    captions: int
    reranker: bool
    multilingual: bool = Field(description="Whether the model reads queries in many languages.")
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
        regions=None if r.regions is None else Regions(**asdict(r.regions)),
        tokens=None
        if r.tokens is None
        else Tokens(tokens=r.tokens.tokens, weights=r.tokens.weights),
    )
