"""Filtered text->image search and deletes as the collection grows (FAISS).

The galleries are `search_scale.py`'s: the real Flickr8k image vectors, then synthetic ones
(a real vector plus noise). Each item gets a `bucket` field (0-99, spread evenly and unrelated
to its vector) and a folder; a filter on `bucket` passes 1 %, 10 % or 50 % of the items, and a
folder prefix 10 %. One query = encode a val caption with the shipped model (on the runtime
`ldot serve` uses), evaluate the filter over the index's metadata columns, search with FAISS's
id selector; p50/p99 over the queries. Recall@10 is against exact search over the items that
pass. A delete is `IndexFolder.delete` of one image: its commit, on disk, timed per call.

    python benchmarks/filtered_search.py [--sizes 100000 1000000] [--queries 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from report import commit, machine, table, write_section
from search_scale import synthetic_gallery

from lightningdot.config import AUTO_RUNTIME, IndexConfig
from lightningdot.data import read_karpathy
from lightningdot.encode import encode_regions
from lightningdot.features import FeatureStore
from lightningdot.index.folder import IndexFolder
from lightningdot.index.record import Manifest
from lightningdot.index.vector import VectorIndex, priors_of
from lightningdot.model.checkpoint import load_model
from lightningdot.retrieval import Page
from lightningdot.runtime import accelerate

ROOT = Path(__file__).resolve().parent.parent
FILTERS = {
    "1 %": {"bucket": {"lt": 1}},
    "10 %": {"bucket": {"lt": 10}},
    "10 % (folder prefix)": {"folder": {"prefix": "f0"}},
    "50 %": {"bucket": {"lt": 50}},
}


def gallery_items(n: int) -> list[dict]:
    # 37 is prime to 100: consecutive (similar) synthetic rows land in different buckets.
    return [
        {"id": f"v{i}", "path": f"f{i % 100:02d}/v{i}.jpg", "meta": {"bucket": (37 * i) % 100}}
        for i in range(n)
    ]


def factories(n: int) -> list[IndexConfig]:
    nlist = 4 * int(np.sqrt(n))
    return [IndexConfig(), IndexConfig(factory=f"IVF{nlist},Flat", nprobe=64)]


def time_one(model, index: VectorIndex, query: str, page: Page) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    with torch.inference_mode():
        vector = model.encode_text([query]).numpy()
    where = page.where(index)
    _, rows = index.search(vector, 10, allowed=None if where is None else where.mask(index.columns))
    return 1e3 * (time.perf_counter() - t0), rows[0]


def recall(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    hits = [
        len(set(g[g >= 0]) & set(w[w >= 0])) / max(1, (w >= 0).sum())
        for g, w in zip(got, want, strict=True)
    ]
    return float(np.mean(hits))


def filtered_rows(model, index, exact, queries, n) -> list[list[str]]:
    rows = []
    for label, spec in {"none": None, **FILTERS}.items():
        page = Page(spec)
        lat, got, want = [], [], []
        for q in queries:
            ms, found = time_one(model, index, q, page)
            lat.append(ms)
            got.append(found)
            want.append(time_one(model, exact, q, page)[1] if exact is not index else found)
        rows.append(
            [
                f"{n:,}",
                index.cfg.factory,
                label,
                f"{np.percentile(lat, 50):.1f}",
                f"{np.percentile(lat, 99):.1f}",
                f"{recall(got, want):.3f}",
            ]
        )
    return rows


def delete_ms(index: VectorIndex, model_id: str, deletes: int) -> float:
    """Median ms of one `IndexFolder.delete` committed on disk."""
    with tempfile.TemporaryDirectory(dir=ROOT / ".cache") as tmp:
        folder = Path(tmp) / "ix"
        IndexFolder.create(folder, Manifest("default", model_id), {"images": index})
        opened = IndexFolder.load(folder, mmap=True)
        times = []
        for i in range(deletes):
            t0 = time.perf_counter()
            opened.delete([f"v{i * 7}"])
            times.append(1e3 * (time.perf_counter() - t0))
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/flickr8k")
    ap.add_argument("--features", type=Path, default=ROOT / ".cache/features/flickr8k-lite2")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--deletes", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = accelerate(load_model("default"), AUTO_RUNTIME)
    corpus = read_karpathy(args.data / "dataset_flickr8k.json")
    store = FeatureStore(args.features)
    keys = [k for k in corpus.keys() if k in store]
    with torch.inference_mode():
        real = encode_regions(
            model, (store.batch(keys[s : s + 256]) for s in range(0, len(keys), 256))
        ).numpy()
    val = read_karpathy(args.data / "dataset_flickr8k.json", "val")
    rng = np.random.default_rng(1)
    queries = [val.captions[i] for i in rng.permutation(len(val.captions))[: args.queries]]
    prior = priors_of(model.bank)[0]
    search_rows, build_rows = [], []
    for n in args.sizes:
        x = synthetic_gallery(real, n, 0.8)
        items = gallery_items(n)
        exact = None
        for cfg in factories(n):
            t0 = time.perf_counter()
            index = VectorIndex.build(x, items, "bench", cfg, prior)
            built = time.perf_counter() - t0
            exact = index if exact is None else exact
            index.columns.numbers("bucket")  # the columns a filter reads are built once
            index.columns.texts("folder")
            search_rows += filtered_rows(model, index, exact, queries, n)
            ms = delete_ms(index, "bench", args.deletes)
            build_rows.append(
                [f"{n:,}", cfg.factory, f"{built:.1f}", f"{ms:.1f}", f"{1e3 / ms:.0f}"]
            )
        del x
    body = "\n".join(
        [
            "## Filtered search and deletes (FAISS, text->image)",
            "",
            f"Machine: {machine()}; commit {commit()}. Gallery: real Flickr8k image vectors, "
            "then synthetic ones (`search_scale.py`), with the shipped model's prior; queries: "
            f"{args.queries} val captions, one at a time, each timed from its text (encode + "
            "filter + search). Recall@10 against exact search over the items the filter "
            "passes. Reproduce: `python benchmarks/filtered_search.py`.",
            "",
            table(
                ["vectors", "index", "filter passes", "p50 ms", "p99 ms", "recall@10"], search_rows
            ),
            "",
            "Build, and one delete committed on disk (`IndexFolder.delete`, median of "
            f"{args.deletes}):",
            "",
            table(["vectors", "index", "build s", "delete ms", "deletes/s"], build_rows),
        ]
    )
    write_section("filtered-search", body)
    print(body)


if __name__ == "__main__":
    main()
