"""Collections into index folders: `ldot index` builds one, `ldot index --add` grows one.

Images come from a collection folder, with their captions when an annotation file names them.
Each item records the root it came from (`lightningdot.index.folder`): the first collection's
images keep their keys as ids; images from another folder get ids prefixed by that root's name,
so two folders holding `a.jpg` never share an id. An image file that does not decode is skipped
and named, as `ldot extract` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lightningdot.config import AUTO_RUNTIME, IndexConfig, RuntimeConfig
from lightningdot.data import Corpus, ImageRecord, read_collection
from lightningdot.encode import Encoded, RegionSource, encode_readable, encode_texts
from lightningdot.errors import DataError
from lightningdot.features import FeatureStore
from lightningdot.index.engines import current_record, open_index
from lightningdot.index.folder import CaptionRows, IndexFolder, Rows, root_name
from lightningdot.index.metadata import file_hash, file_metadata, read_fields_file
from lightningdot.index.milvus import (
    MilvusTarget,
    Priors,
    build_milvus,
    check_target,
    drop_replaced,
)
from lightningdot.index.record import Manifest
from lightningdot.index.states import RegionStates
from lightningdot.index.storage import check_buildable
from lightningdot.index.vector import VectorIndex, priors_of, recall_against_exact
from lightningdot.model.checkpoint import index_identity, load_model
from lightningdot.model.encoders import BiEncoder
from lightningdot.progress import Progress, Silent
from lightningdot.runtime import accelerate


def image_items(
    images: list[ImageRecord],
    root: str,
    prefix: str = "",
    folder: Path | None = None,
    fields: dict[str, dict] | None = None,
    hashes: dict[str, str] | None = None,
) -> list[dict]:
    """The items of a collection's images; with `folder`, the root's folder, with what their
    files say of them (`lightningdot.index.metadata`), the hash of their bytes (`hashes`,
    by path, where known already), and the user's `fields` by path."""
    items = [
        {"id": prefix + im.key, "root": root, "path": im.key, "captions": im.captions}
        for im in images
    ]
    for it in items:
        meta = file_metadata(folder / it["path"]) if folder is not None else {}
        meta.update((fields or {}).get(it["path"], {}))
        if meta:
            it["meta"] = meta
        if folder is not None:
            digest = (hashes or {}).get(it["path"]) or file_hash(folder / it["path"])
            if digest is not None:
                it["hash"] = digest
    return items


def caption_items(items: list[dict]) -> list[dict]:
    return [
        {"id": f"{it['id']}#{j}", "image": it["id"], "caption": c}
        for it in items
        for j, c in enumerate(it["captions"])
    ]


@dataclass
class BuildReport:
    indexes: dict[str, VectorIndex | RegionStates]  # those written into the folder (FAISS)
    counts: dict[str, int] = field(default_factory=dict)  # items per part ("images", ...)
    recall_at_10: float | None = None  # of an approximate image index against exact search
    recall_queries: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key, why) of images skipped
    skipped_fields: list[tuple[str, str]] = field(default_factory=list)  # (row, why)


@dataclass
class AddReport:
    added: int  # images added
    total: int  # images in the index after the add
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key, why) of images skipped
    skipped_fields: list[tuple[str, str]] = field(default_factory=list)  # (row, why)


def _encode(
    model: BiEncoder, corpus: Corpus, source: RegionSource, progress: Progress, states: bool
) -> tuple[Corpus, Encoded]:
    """The images that decode (as a corpus) and their vectors (and, with `states`, theirs)."""
    progress.start(len(corpus.images), "encoding images")
    encoded = encode_readable(model, source, corpus.keys(), progress, states)
    return Corpus([corpus.images[n] for n in encoded.kept]), encoded


def build_index(
    model: BiEncoder,
    model_name: str,
    corpus: Corpus,
    image_dir: Path,
    out: Path,
    cfg: IndexConfig | None = None,
    features: FeatureStore | None = None,
    progress: Progress | None = None,
    recall_sample: int = 1000,
    states: bool = True,
    fields: dict[str, dict] | None = None,
    milvus: MilvusTarget | None = None,
) -> BuildReport:
    """Encode a collection (reusing stored features when given) into the index folder `out`,
    new or replaced whole in one commit; with `milvus`, its vectors into Milvus collections
    there (`lightningdot.index.milvus`; no region states).

    With an approximate factory, also measures recall@10 of the image index against exact search
    on up to `recall_sample` queries (the captions when known, else the images themselves).
    A model with a query bank gives both indexes its priors. With `states`, the folder also
    keeps what re-ranking reads of each image (`lightningdot.index.states`).

    Raises:
        DataError: no image decodes, or `out` is not a folder a build may write (see
            `IndexFolder.create`).
    """
    cfg, out = cfg or IndexConfig(), Path(out)
    priors = Priors(*priors_of(model.bank))
    milvus = _check_build(model, out, cfg, priors, milvus)
    source = RegionSource.of(model, features, image_dir)
    keep = states and milvus is None
    corpus, encoded = _encode(model, corpus, source, progress or Silent(), keep)
    if not corpus.images:
        raise DataError(f"none of the images under {image_dir} could be read")
    vectors, root = encoded.vectors.numpy(), Path(image_dir).resolve()
    items = image_items(corpus.images, root_name(root), folder=root, fields=fields)
    captions = None
    if corpus.captions:
        captions = (encode_texts(model, corpus.captions).numpy(), caption_items(items))
    store = None if features is None else str(Path(features.root).resolve())
    roots = {items[0]["root"]: str(root)}
    manifest = Manifest(model_name, index_identity(model), roots=roots, features=store)
    previous = current_record(out)
    if milvus is None:
        report = _faiss_parts(manifest, (vectors, items), captions, encoded, priors, cfg)
        report.recall_at_10, report.recall_queries = _recall(
            report.indexes["images"], (vectors, items), captions, recall_sample
        )
        IndexFolder.create(out, manifest, report.indexes)
    else:
        build_milvus(out, manifest, milvus, (vectors, items), captions, priors, cfg)
        report = BuildReport({}, failed=encoded.failed)
    report.counts = {"images": len(items), "captions": len(captions[1]) if captions else 0}
    drop_replaced(previous, Manifest.read(out))
    return report


def _check_build(model, out: Path, cfg, priors, milvus: MilvusTarget | None):
    """Refuse a build before any encoding (it checks the folder again under its lock); returns
    the Milvus target resolved (None for FAISS)."""
    check_buildable(out)
    if milvus is None:
        VectorIndex.check_factory(cfg.factory, model.cfg.embed_dim + (priors.beta is not None))
        return None
    milvus = milvus.resolved(out)
    check_target(milvus, cfg)
    return milvus


def _faiss_parts(manifest, images, captions, encoded, priors, cfg) -> BuildReport:
    """The parts of a FAISS folder: image and caption indexes, and states when encoded."""
    identity = manifest.model_id
    report = BuildReport(
        {"images": VectorIndex.build(*images, identity, cfg, priors.images)},
        failed=encoded.failed,
    )
    if encoded.states is not None:
        report.indexes["states"] = RegionStates.build(encoded.states)
    if captions is not None:
        report.indexes["captions"] = VectorIndex.build(*captions, identity, cfg, priors.captions)
    return report


def _recall(
    index: VectorIndex, images: tuple, captions: tuple | None, sample: int
) -> tuple[float | None, int]:
    """Recall@10 of an approximate image index against exact search over the same `images`
    (vectors, items), on up to `sample` queries (the captions when known, else the images)."""
    if index.cfg.factory == "Flat":
        return None, 0
    exact = VectorIndex.build(*images, index.model_id, prior=index.prior)
    queries = captions[0] if captions is not None else images[0]
    chosen = queries[np.random.default_rng(0).permutation(len(queries))[:sample]]
    return recall_against_exact(index, exact, chosen, 10), len(chosen)


def add_collection(
    index: IndexFolder,
    model: BiEncoder,
    corpus: Corpus,
    image_dir: Path,
    features: FeatureStore | None = None,
    progress: Progress | None = None,
    fields: dict[str, dict] | None = None,
) -> AddReport:
    """Append the corpus's images not yet indexed (and their captions) in one commit, without a
    rebuild. Run again after an interruption, it adds what the interrupted run did not.

    What is new is decided on what is committed, then encoded without holding the folder (a
    server's uploads go on meanwhile), then decided again by the commit itself.
    """
    with index.writing():
        root = index.root_for(Path(image_dir))
        prefix = "" if root == index.manifest.primary_root else f"{root}/"
        items = image_items(corpus.images, root, prefix)
        where = Path(image_dir).resolve()
        fresh = [
            im for im, it in zip(corpus.images, items, strict=True) if not index.indexed(it, where)
        ]
    if not fresh:
        return AddReport(0, index.image_index.count)
    source = RegionSource.of(model, features, image_dir)
    keeps = index.states is not None
    readable, encoded = _encode(model, Corpus(fresh), source, progress or Silent(), keeps)
    added = 0
    if readable.images:
        items = image_items(readable.images, root, prefix, where, fields)
        captions: CaptionRows | None = None
        if readable.captions:
            captions = (encode_texts(model, readable.captions).numpy(), caption_items(items))
        rows = Rows(
            encoded.vectors.numpy(), items, captions, (root, str(where)), states=encoded.states
        )
        added = sum(index.append(rows))
    return AddReport(added, index.image_index.count, encoded.failed)


def index_images(
    out: Path,
    image_dir: Path,
    annotations: Path | None = None,
    split: str | None = None,
    model: str | None = None,
    factory: str = "Flat",
    features: Path | None = None,
    progress: Progress | None = None,
    runtime: RuntimeConfig = AUTO_RUNTIME,
    states: bool = True,
    fields_file: Path | None = None,
    milvus: MilvusTarget | None = None,
) -> BuildReport:
    """`ldot index`: the images an annotation file names (with their captions), or every image
    under `image_dir`, into the index folder `out`, by `model` (default: "default") run on
    `runtime`; `states`: keep what re-ranking reads of each image (about 63 KB each);
    `fields_file`: the user's fields of the images (`read_fields_file`); `milvus`: where the
    vectors go, when not into FAISS indexes in the folder."""
    corpus = read_collection(image_dir, annotations, split)
    fields, skipped = user_fields(fields_file, corpus)
    model = model or "default"
    net = accelerate(load_model(model), runtime)
    if Path(model).is_dir():  # recorded so that the folder opens from any working directory
        model = str(Path(model).resolve())
    store = FeatureStore(features) if features is not None else None
    cfg = IndexConfig(factory=factory)
    args = (net, model, corpus, image_dir, out, cfg, store, progress)
    report = build_index(*args, states=states, fields=fields, milvus=milvus)
    report.skipped_fields = skipped
    return report


def user_fields(path: Path | None, corpus: Corpus) -> tuple[dict[str, dict], list]:
    """The fields file's rows for the corpus's images, and the rows skipped (a row naming an
    image the corpus lacks among them)."""
    if path is None:
        return {}, []
    fields, skipped = read_fields_file(path)
    keys = set(corpus.keys())
    skipped += [(p, "no such image in the collection") for p in fields if p not in keys]
    return {p: f for p, f in fields.items() if p in keys}, skipped


def add_images(
    out: Path,
    image_dir: Path,
    annotations: Path | None = None,
    split: str | None = None,
    model: str | None = None,
    features: Path | None = None,
    progress: Progress | None = None,
    runtime: RuntimeConfig = AUTO_RUNTIME,
    fields_file: Path | None = None,
) -> AddReport:
    """`ldot index --add`: the collection's images not yet in the index folder `out` (by
    default with the model that built it, run on `runtime`), with the user's fields from
    `fields_file`."""
    corpus = read_collection(image_dir, annotations, split)
    fields, skipped = user_fields(fields_file, corpus)
    net = accelerate(load_model(model or Manifest.read(Path(out)).model), runtime)
    index = open_index(out, net, mmap=False)
    store = FeatureStore(features) if features is not None else None
    report = add_collection(index, net, corpus, Path(image_dir), store, progress, fields)
    report.skipped_fields = skipped
    return report
