"""FAISS and Milvus-lite side by side, through the one index interface (`View.search`).

The galleries and filters are `filtered_search.py`'s: the real Flickr8k image vectors, then
synthetic ones, each item with a `bucket` field (0-99) and a folder; the shipped model's
prior in every vector. Each backend is built from the same vectors into an index folder, by
the project's own code (`VectorIndex.build` + `IndexFolder.create`; `build_milvus`, whose
time includes inserting the rows with their items and flushing them). Flat and IVF indexes
(IVF4√n, nprobe 64) on both. One query = encode a val caption + parse the filter + search
for the top 10, one at a time; p50/p99 over the queries. Recall@10 is against exact search
(FAISS Flat) over the items the filter passes. A delete is `IndexFolder.delete` (FAISS) or
`MilvusFolder.delete` (Milvus) of one image, its commit done, the median of several.

    python benchmarks/backends.py [--sizes 100000 1000000] [--queries 100]
        [--milvus Flat IVF] [--nprobe 64] [--section backends]

`--milvus IVF` builds only the IVF index on Milvus (a milvus-lite build of 1M rows takes most
of an hour here), `--milvus` alone none; FAISS builds both, the exact one being the reference
for recall. `--nprobe 16 32 64` searches the one FAISS IVF index at each of these settings
(nprobe is read at search time, so the index is built once); Milvus IVF uses the first.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from filtered_search import FILTERS, factories, gallery_items, recall
from report import commit, machine, table, write_section
from search_scale import synthetic_gallery

from lightningdot.config import AUTO_RUNTIME
from lightningdot.data import read_karpathy
from lightningdot.encode import encode_regions
from lightningdot.features import FeatureStore
from lightningdot.index.engines import load_index
from lightningdot.index.filters import parse_filter
from lightningdot.index.folder import IndexFolder
from lightningdot.index.milvus import MilvusTarget, Priors, build_milvus
from lightningdot.index.record import Manifest
from lightningdot.index.vector import VectorIndex, priors_of
from lightningdot.model.checkpoint import load_model
from lightningdot.runtime import accelerate

ROOT = Path(__file__).resolve().parent.parent


def build(backend: str, folder: Path, x: np.ndarray, items, cfg, priors: Priors) -> float:
    """Seconds to build the index folder `folder` on `backend`."""
    manifest = Manifest("default", "bench")
    t0 = time.perf_counter()
    if backend == "faiss":
        index = VectorIndex.build(x, items, "bench", cfg, priors.images)
        IndexFolder.create(folder, manifest, {"images": index})
    else:
        target = MilvusTarget(str(folder.parent / "milvus.db"), f"b{folder.name}")
        build_milvus(folder, manifest, target, (x, items), None, priors, cfg)
    return time.perf_counter() - t0


def search(model, view, query: str, spec) -> tuple[float, list[str]]:
    """Ms of one query from its text, and the ids it found."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        vector = model.encode_text([query]).numpy()
    where = parse_filter(spec, view.images.kinds) if spec else None
    (hits,) = view.search("images", vector, 10, where)
    return 1e3 * (time.perf_counter() - t0), [h.item["id"] for h in hits]


def search_rows(model, view, exact, queries, label) -> list[list[str]]:
    rows = []
    for name, spec in {"none": None, **FILTERS}.items():
        lat, got, want = [], [], []
        for q in queries:
            ms, found = search(model, view, q, spec)
            lat.append(ms)
            got.append(found)
            want.append(search(model, exact, q, spec)[1])
        ids = {i: n for n, i in enumerate({i for w in want + got for i in w})}
        as_rows = (
            [np.array([ids[i] for i in r]) for r in got],
            [np.array([ids[i] for i in r]) for r in want],
        )
        rows.append(
            [
                *label,
                name,
                f"{np.percentile(lat, 50):.1f}",
                f"{np.percentile(lat, 99):.1f}",
                f"{recall(*as_rows):.3f}",
            ]
        )
    return rows


def nprobe_rows(model, view, exact, queries, label, nprobes: list[int]) -> list[list[str]]:
    """`search_rows` of one FAISS IVF index at each nprobe (a search-time setting)."""
    rows, cfg = [], view.images.cfg
    for nprobe in nprobes:
        view.images.tune(dataclasses.replace(cfg, nprobe=nprobe))
        rows += search_rows(
            model, view, exact, queries, [*label[:2], f"{label[2]} nprobe {nprobe}"]
        )
    view.images.tune(cfg)
    return rows


def delete_ms(folder: IndexFolder, deletes: int) -> float:
    times = []
    for i in range(deletes):
        t0 = time.perf_counter()
        folder.delete([f"v{i * 7}"])
        times.append(1e3 * (time.perf_counter() - t0))
    return float(np.median(times))


def real_vectors(model, data: Path, features: Path) -> np.ndarray:
    corpus = read_karpathy(data / "dataset_flickr8k.json")
    store = FeatureStore(features)
    keys = [k for k in corpus.keys() if k in store]
    with torch.inference_mode():
        batches = (store.batch(keys[s : s + 256]) for s in range(0, len(keys), 256))
        return encode_regions(model, batches).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/flickr8k")
    ap.add_argument("--features", type=Path, default=ROOT / ".cache/features/flickr8k-lite2")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--deletes", type=int, default=10)
    ap.add_argument("--milvus", nargs="*", choices=["Flat", "IVF"], default=["Flat", "IVF"])
    ap.add_argument("--nprobe", type=int, nargs="+", default=[64], help="IVF lists visited")
    ap.add_argument("--section", default="backends", help="BENCHMARKS.md section to write")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = accelerate(load_model("default"), AUTO_RUNTIME)
    real = real_vectors(model, args.data, args.features)
    val = read_karpathy(args.data / "dataset_flickr8k.json", "val")
    rng = np.random.default_rng(1)
    queries = [val.captions[i] for i in rng.permutation(len(val.captions))[: args.queries]]
    priors = Priors(*priors_of(model.bank))
    found, built = [], []
    for n in args.sizes:
        x, items = synthetic_gallery(real, n, 0.8), gallery_items(n)
        with tempfile.TemporaryDirectory(dir=ROOT / ".cache") as tmp:
            exact = None
            for cfg in factories(n):
                kind = "Flat" if cfg.factory == "Flat" else "IVF"
                if kind == "IVF":  # Milvus IVF takes its nprobe from here
                    cfg = dataclasses.replace(cfg, nprobe=args.nprobe[0])
                for backend in ("faiss", "milvus") if kind in args.milvus else ("faiss",):
                    folder = Path(tmp) / f"{backend}{len(built)}"
                    seconds = build(backend, folder, x, items, cfg, priors)
                    opened = load_index(folder)
                    view = opened.live
                    exact = exact or view
                    label = [f"{n:,}", backend, cfg.factory]
                    search(model, view, queries[0], FILTERS["10 %"])  # columns, caches: once
                    if (backend, kind) == ("faiss", "IVF"):
                        found += nprobe_rows(model, view, exact, queries, label, args.nprobe)
                    else:
                        found += search_rows(model, view, exact, queries, label)
                    ms = delete_ms(opened, args.deletes)
                    built.append([*label, f"{seconds:.1f}", f"{ms:.1f}", f"{1e3 / ms:.0f}"])
                    print(built[-1], flush=True)
        del x
    sizes = " and ".join(f"{n:,}" for n in args.sizes)
    skipped = [k for k in ("Flat", "IVF") if k not in args.milvus]
    body = "\n".join(
        [
            f"## FAISS and Milvus-lite side by side at {sizes} vectors (text->image)",
            "",
            f"Machine: {machine()}; commit {commit()}. Gallery and filters as in "
            "`filtered_search.py`; both backends built from the same vectors (the shipped "
            f"model's prior included) and searched through `View.search`; queries: "
            f"{args.queries} val captions, one at a time, each timed from its text (encode + "
            "filter + search). Recall@10 against exact search (FAISS Flat) over the items the "
            "filter passes. Milvus is milvus-lite, embedded, in the same process. Reproduce: "
            f"`python benchmarks/backends.py --sizes {' '.join(map(str, args.sizes))} "
            f"--queries {args.queries} {' '.join(['--milvus', *args.milvus])} "
            f"--nprobe {' '.join(map(str, args.nprobe))}`."
            + (f" Milvus {' and '.join(skipped)} not built (`--milvus`)." if skipped else ""),
            "",
            table(
                ["vectors", "backend", "index", "filter passes", "p50 ms", "p99 ms", "recall@10"],
                found,
            ),
            "",
            "Build (the folder committed, Milvus rows inserted and flushed), and one delete "
            f"committed (median of {args.deletes}):",
            "",
            table(["vectors", "backend", "index", "build s", "delete ms", "deletes/s"], built),
        ]
    )
    write_section(args.section, body)
    print(body)


if __name__ == "__main__":
    main()
