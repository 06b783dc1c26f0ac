"""Text->image latency and throughput as the gallery grows: exact against approximate search.

One text query = encode it with the shipped model + search the index for the top 10, timed one
query at a time (p50, p99 over the queries); throughput answers all queries as one batch.
Queries are real Flickr8k val captions. The galleries past Flickr8k's 8,000 images are
synthetic: each vector is a real image vector (Flickr8k train + val, encoded by the model) plus
Gaussian noise of norm `--noise`, renormalised, so the collection keeps the clustered shape of
real embeddings without a million photos. Recall@10 of an approximate index is measured against
exact search on the same queries.

    python benchmarks/search_scale.py [--sizes 10000 100000 1000000] [--queries 200]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from report import commit, machine, table, write_section

from lightningdot.config import IndexConfig
from lightningdot.data import read_karpathy
from lightningdot.encode import encode_regions
from lightningdot.features import FeatureStore
from lightningdot.index.vector import VectorIndex, priors_of, recall_against_exact
from lightningdot.model.checkpoint import load_model

ROOT = Path(__file__).resolve().parent.parent


def synthetic_gallery(real: np.ndarray, n: int, noise: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, real.shape[1]), dtype=np.float32)
    for s in range(0, n, 100_000):  # in slices, to keep the temporary arrays small
        m = min(n, s + 100_000) - s
        base = real[rng.integers(0, len(real), m)]
        jitter = rng.standard_normal((m, real.shape[1]), dtype=np.float32)
        jitter *= noise / np.sqrt(real.shape[1])
        x = base + jitter
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out[: len(real)] = real[: min(n, len(real))]
    return out


def time_queries(model, index: VectorIndex, queries: list[str]) -> tuple[float, float, float]:
    """(p50 ms, p99 ms) of one query at a time, and queries/s answering them as one batch."""
    lat = []
    with torch.inference_mode():
        for q in queries:
            t0 = time.perf_counter()
            index.search(model.encode_text([q]).numpy(), 10)
            lat.append(1e3 * (time.perf_counter() - t0))
        t0 = time.perf_counter()
        index.search(model.encode_text(queries).numpy(), 10)
        qps = len(queries) / (time.perf_counter() - t0)
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), qps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/flickr8k")
    ap.add_argument("--features", type=Path, default=ROOT / ".cache/features/flickr8k-lite2")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--noise", type=float, default=0.8)
    args = ap.parse_args()

    model = load_model("default")
    corpus = read_karpathy(args.data / "dataset_flickr8k.json")
    store = FeatureStore(args.features)
    keys = [k for k in corpus.keys() if k in store]
    with torch.inference_mode():
        batches = (store.batch(keys[s : s + 256]) for s in range(0, len(keys), 256))
        real = encode_regions(model, batches).numpy()
    val = read_karpathy(args.data / "dataset_flickr8k.json", "val")
    rng = np.random.default_rng(1)
    queries = [val.captions[i] for i in rng.permutation(len(val.captions))[: args.queries]]
    with torch.inference_mode():
        qvecs = model.encode_text(queries).numpy()
        model.encode_text(queries[:1])  # warm-up

    prior = priors_of(model.bank)[0]  # as `ldot index` builds it for this model
    rows = []
    for n in args.sizes:
        gallery = synthetic_gallery(real, n, args.noise)
        items = [{"id": str(i)} for i in range(n)]
        exact = None
        nlist = int(4 * np.sqrt(n))  # FAISS's rule of thumb for IVF
        kinds = [
            ("Flat", IndexConfig("Flat")),
            (f"IVF{nlist},Flat nprobe=16", IndexConfig(f"IVF{nlist},Flat", nprobe=16)),
        ]
        kinds.append(("HNSW32 efSearch=64", IndexConfig("HNSW32", ef_search=64)))
        for label, cfg in kinds:
            t0 = time.perf_counter()
            index = VectorIndex.build(gallery, items, "scale", cfg, prior)
            build_s = time.perf_counter() - t0
            p50, p99, qps = time_queries(model, index, queries)
            if exact is None:
                exact = index
                recall = "1 (exact)"
            else:
                r = recall_against_exact(index, exact, qvecs, 10)
                recall = f"{r:.3f}"
            rows.append(
                [
                    f"{n:,}",
                    label,
                    f"{build_s:.1f}",
                    f"{p50:.2f}",
                    f"{p99:.2f}",
                    f"{qps:.0f}",
                    recall,
                ]
            )
            print(rows[-1], flush=True)
            if index is not exact:
                del index
        del exact, gallery

    body = "\n".join(
        [
            "## Text->image search as the gallery grows (encode one query + top-10 search)",
            "",
            f"Machine: {machine()}; commit {commit()}. {len(queries)} real Flickr8k val captions "
            f"as queries; galleries are the {len(real):,} real image vectors plus synthetic ones "
            f"(a real vector + Gaussian noise of norm {args.noise}, renormalised). "
            f"Vectors: {model.cfg.vector_dim}-d"
            + (
                ", plus each item's query-bank prior (its cost is in the build time)"
                if prior
                else ""
            )
            + ". Latency: one query at a time, encode + search; throughput: all queries as one batch. "
            "Reproduce: `python benchmarks/search_scale.py`.",
            "",
            table(
                [
                    "gallery",
                    "index",
                    "build s",
                    "p50 ms",
                    "p99 ms",
                    "queries/s (batched)",
                    "recall@10 vs exact",
                ],
                rows,
            ),
        ]
    )
    write_section("search-scale", body)
    print(body)


if __name__ == "__main__":
    main()
