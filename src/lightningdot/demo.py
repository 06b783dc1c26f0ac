"""`ldot demo`: index a gallery of real photos with the default model and query it both ways.

The gallery is scikit-image's sample photographs (they ship inside its wheel), so the demo needs
no download beyond the package registry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lightningdot.encode import RegionSource, encode_collection
from lightningdot.errors import DataError
from lightningdot.index.vector import VectorIndex
from lightningdot.model.checkpoint import index_identity, load_model
from lightningdot.model.coverage import reads_many_languages

# Photographs among scikit-image's bundled data (the rest are charts, scans or binary masks).
GALLERY = [
    "astronaut.png",
    "brick.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "moon.png",
    "motorcycle_left.png",
    "rocket.jpg",
    "retina.jpg",
    "page.png",
    "clock_motion.png",
    "horse.png",
]
# Queries in the vocabulary of Flickr8k, the model's training set (people, animals, outdoor
# scenes), and objects its captions hardly name, found through the concept view of the
# backbone's ImageNet classes (`lightningdot.model.concepts`).
TEXT_QUERIES = [
    "a brown horse standing in a field",
    "a cup of coffee on a table",
    "a motorcycle parked indoors",
    "a man with a camera",
    "a person in a red jacket",
    "green grass",
    "a cat",
    "a rocket",
    "a clock",
]
# The same scenes asked in other languages, for a model that reads them (`--model multilingual`):
# the five it was trained on, one it was not, and a query that switches language halfway.
OTHER_LANGUAGE_QUERIES = [
    "一匹棕色的马站在田野里",  # Chinese: a brown horse standing in a field
    "Ein Mann mit einer Kamera",  # German: a man with a camera
    "Uma xícara de café sobre a mesa",  # Portuguese: a cup of coffee on a table
    "Une personne en veste rouge",  # French: a person in a red jacket
    "Motorka zaparkovaná uvnitř",  # Czech: a motorcycle parked indoors
    "Una motocicleta estacionada",  # Spanish: a parked motorcycle
    "a brown horse 在田野里",  # English, then Chinese
]
IMAGE_QUERY = "motorcycle_left.png"


def gallery_dir() -> Path:
    try:
        import skimage.data
    except ImportError as e:
        raise DataError("the demo gallery ships with scikit-image: pip install scikit-image") from e
    return Path(skimage.data.__file__).parent


@dataclass
class Hit:
    name: str
    score: float


@dataclass
class DemoResult:
    query: str
    hits: list[Hit]
    encode_ms: float
    search_ms: float


def run_demo(model_name: str = "default", k: int = 3) -> tuple[list[DemoResult], dict[str, float]]:
    """Index the sample photos with the model, then run its text queries and one image query."""
    folder = gallery_dir()
    names = [name for name in GALLERY if (folder / name).is_file()]
    if not names:
        raise DataError(f"no sample photos found in {folder}")
    model = load_model(model_name)
    source = RegionSource.of(model, root=folder)
    _ = source.backbone  # loaded before the clock starts: the figure is the encoding alone
    t0 = time.perf_counter()
    image_vecs = encode_collection(model, source, names)
    index_s = time.perf_counter() - t0
    index = VectorIndex.build(image_vecs.numpy(), [{"id": n} for n in names], index_identity(model))
    queries = TEXT_QUERIES
    if reads_many_languages(model.cfg.text):
        queries = TEXT_QUERIES + OTHER_LANGUAGE_QUERIES
    with torch.inference_mode():
        results = [_text_query(model, index, names, q, k) for q in queries]
        results.append(_image_query(model, index, names, source, k))
    return results, {"images": len(names), "index_s": index_s}


def _text_query(model, index: VectorIndex, names: list[str], query: str, k: int) -> DemoResult:
    t1 = time.perf_counter()
    vec = model.encode_text([query]).numpy()
    t2 = time.perf_counter()
    scores, ids = index.search(vec, k)
    t3 = time.perf_counter()
    hits = [Hit(names[i], float(s)) for s, i in zip(scores[0], ids[0], strict=True)]
    return DemoResult(query, hits, 1e3 * (t2 - t1), 1e3 * (t3 - t2))


def _image_query(model, index: VectorIndex, names, source: RegionSource, k: int) -> DemoResult:
    """The image vector against the demo captions (image->text) and the gallery."""
    t1 = time.perf_counter()
    vec = model.encode_image(source.of_images([source.file(IMAGE_QUERY)]))
    t2 = time.perf_counter()
    caption_scores = model.score(model.encode_text(TEXT_QUERIES), vec)[:, 0]
    scores, ids = index.search(vec.numpy(), k + 1)
    t3 = time.perf_counter()
    best = caption_scores.topk(2)
    hits = [
        Hit(f"caption: {TEXT_QUERIES[i]}", float(s))
        for s, i in zip(best.values, best.indices, strict=True)
    ]
    hits += [
        Hit(names[i], float(s))
        for s, i in zip(scores[0], ids[0], strict=True)
        if names[i] != IMAGE_QUERY
    ]
    return DemoResult(f"[image] {IMAGE_QUERY}", hits, 1e3 * (t2 - t1), 1e3 * (t3 - t2))
