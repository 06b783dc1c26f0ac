"""Load test of `ldot serve`: throughput and latency of text queries at 1, 8 and 32 clients.

The server runs in its own process (`ldot serve --no-access-log`) on 127.0.0.1, over a
10,000-image index: every Flickr8k image of the feature store, encoded by the shipped model,
plus random unit vectors up to 10,000. The random rows cost a search what real rows cost but,
lying far from every real embedding, never reach a top 16, so re-ranking reads only real
regions (a request that met one would fail and count as an error).

Clients are asyncio tasks in this process, on the same machine, sharing one aiohttp connection
pool (aiohttp rather than httpx: on two cores the client's own CPU time competes with the
server's, and httpx spends about five times as much per request). Each sends its next query as soon as the last is answered (a closed loop), for
`--seconds` per setting after a warm-up. Queries are real Flickr8k val captions, k = 10.
Settings: plain search; re-ranking the top 16; plain search while another client adds images
(POST /images, one Flickr8k val photo per request, mirrored so that it is new to the index).

    python benchmarks/serve_load.py [--seconds 15] [--clients 1 8 32]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
import torch
from PIL import Image, ImageOps
from report import commit, machine, table, write_section

from lightningdot.data import read_karpathy
from lightningdot.encode import RegionSource, encode_collection
from lightningdot.errors import LightningDotError
from lightningdot.features import FeatureStore
from lightningdot.index.build import image_items
from lightningdot.index.folder import IndexFolder
from lightningdot.index.record import Manifest
from lightningdot.index.vector import VectorIndex, priors_of
from lightningdot.model.checkpoint import index_identity, load_model

ROOT = Path(__file__).resolve().parent.parent


def build_gallery(out: Path, data: Path, features: Path, size: int) -> None:
    """Write the index folder the server loads (kept in .cache, reused while the model and size
    are the same)."""
    model = load_model("default")
    prior = priors_of(model.bank)[0]  # as `ldot index` builds it for this model
    try:
        cached = IndexFolder.load(out, index_identity(model)).image_index
        if len(cached) == size and (cached.prior is None) == (prior is None):
            return
    except LightningDotError:
        pass  # none yet, or made by another model
    corpus = read_karpathy(data / "dataset_flickr8k.json")
    store = FeatureStore(features)
    records = [im for im in corpus.images if im.key in store][:size]
    with torch.inference_mode():
        source = RegionSource(model.cfg.backbone, store)
        real = encode_collection(model, source, [r.key for r in records])
    noise = torch.nn.functional.normalize(
        torch.randn(size - len(real), real.shape[1], generator=torch.Generator().manual_seed(0)),
        dim=-1,
    )
    items = image_items(records, "images")
    items += [{"id": f"random-{i}"} for i in range(len(noise))]
    identity = index_identity(model)
    gallery = torch.cat([real, noise]).numpy()
    roots = {"images": str((data / "images").resolve())}
    manifest = Manifest("default", identity, roots=roots, features=str(features.resolve()))
    images = VectorIndex.build(gallery, items, identity, prior=prior)
    IndexFolder.create(out, manifest, {"images": images})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, port: int, threads: int) -> subprocess.Popen:
    ldot = Path(sys.executable).parent / "ldot"
    cmd = [str(ldot), "serve", str(index), "--port", str(port), "--no-access-log"]
    cmd += ["--threads", str(threads)]
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: nobody reads it while it serves
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the server exited: {log.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError("the server did not answer within 120 s")


async def closed_loop(
    client: aiohttp.ClientSession, clients: int, seconds: float, queries: list[str], rerank: int
) -> dict:
    """`clients` tasks, each sending its next query as soon as the last is answered."""
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal errors
        i = w
        while time.perf_counter() < stop:
            params = {"q": queries[i % len(queries)], "k": "10", "rerank": str(rerank)}
            i += clients
            t0 = time.perf_counter()
            try:
                async with client.get("/search", params=params) as r:
                    await r.read()
                    ok = r.status == 200
            except aiohttp.ClientError:
                ok = False
            if ok:
                latencies.append(1e3 * (time.perf_counter() - t0))
            else:
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(clients)))
    elapsed = time.perf_counter() - start
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {
        "requests": len(latencies) + errors,
        "qps": len(latencies) / elapsed,
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "errors": errors,
    }


def mirrored_jpeg(path: Path) -> bytes:
    buf = io.BytesIO()
    ImageOps.mirror(Image.open(path).convert("RGB")).save(buf, "JPEG", quality=90)
    return buf.getvalue()


async def keep_adding(
    client: aiohttp.ClientSession, photos: list[Path], stop: asyncio.Event
) -> dict:
    """POST one new image at a time until `stop`; the adds' latencies and failures."""
    latencies, failures = [], 0
    for path in photos:
        if stop.is_set():
            break
        form = aiohttp.FormData()
        form.add_field(
            "files",
            mirrored_jpeg(path),
            filename=f"mirrored-{path.name}",
            content_type="image/jpeg",
        )
        t0 = time.perf_counter()
        async with client.post("/images", data=form) as r:
            ok = r.status == 200 and (await r.json())["images"][0]["added"]
        if ok:
            latencies.append(1e3 * (time.perf_counter() - t0))
        else:
            failures += 1
    return {"added": len(latencies), "failures": failures, "p50": float(np.median(latencies))}


async def run(args, url: str, queries: list[str], photos: list[Path]) -> tuple[list, dict]:
    rows, adds = [], {}
    connector = aiohttp.TCPConnector(limit=max(args.clients) + 2)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as client:
        settings = [("search", n, 0, False) for n in args.clients]
        if not args.search_only:
            settings += [("search + re-rank top 16", n, 16, False) for n in args.clients]
            settings += [("search while adding images", max(args.clients), 0, True)]
        for label, n, rerank, adding in settings:
            await closed_loop(client, n, args.warmup, queries, rerank)
            before = await scrape(client)
            stop = asyncio.Event()
            adder = asyncio.create_task(keep_adding(client, photos, stop)) if adding else None
            stats = await closed_loop(client, n, args.seconds, queries, rerank)
            if adder is not None:
                stop.set()
                adds = await adder
            after = await scrape(client)
            batch = batch_between(before, after)
            rows.append(
                [
                    label,
                    str(n),
                    str(stats["requests"]),
                    f"{stats['qps']:.1f}",
                    f"{stats['p50']:.1f}",
                    f"{stats['p99']:.1f}",
                    f"{batch:.1f}",
                    str(stats["errors"]),
                ]
            )
            print(rows[-1], flush=True)
    return rows, adds


async def scrape(client: aiohttp.ClientSession) -> str:
    async with client.get("/metrics") as r:
        return await r.text()


def batch_between(before: str, after: str) -> float:
    """Mean text batch size over the requests between two /metrics scrapes."""

    def read(text: str) -> tuple[float, float]:
        s = re.search(r"^ldot_text_batch_size_sum (\S+)$", text, re.M)
        c = re.search(r"^ldot_text_batch_size_count (\S+)$", text, re.M)
        return float(s.group(1)), float(c.group(1))

    (s0, c0), (s1, c1) = read(before), read(after)
    return (s1 - s0) / max(c1 - c0, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/flickr8k")
    ap.add_argument("--features", type=Path, default=ROOT / ".cache/features/flickr8k-lite2")
    ap.add_argument("--gallery", type=int, default=10_000)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=0, help="The server's torch threads.")
    ap.add_argument("--search-only", action="store_true", help="Skip re-ranking and adding.")
    ap.add_argument("--no-write", action="store_true", help="Print, leave BENCHMARKS.md alone.")
    args = ap.parse_args()

    cached = ROOT / f".cache/index/serve-{args.gallery}"
    build_gallery(cached, args.data, args.features, args.gallery)
    val = read_karpathy(args.data / "dataset_flickr8k.json", "val")
    rng = np.random.default_rng(0)
    queries = [val.captions[i] for i in rng.permutation(len(val.captions))[:2000]]
    photos = [args.data / "images" / k for k in val.keys()]

    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "index"
        shutil.copytree(cached, index)  # adds write to the index folder
        port = free_port()
        server = start_server(index, port, args.threads)
        try:
            rows, adds = asyncio.run(run(args, f"http://127.0.0.1:{port}", queries, photos))
        finally:
            server.terminate()
            server.wait(30)

    body = "\n".join(
        [
            "## HTTP service under load (`ldot serve`, 10,000-image index, text queries)",
            "",
            f"Machine: {machine()}; commit {commit()}. Server and clients share the machine. "
            f"Closed loop: each client sends its next query when the last is answered, for "
            f"{args.seconds:g} s per row after {args.warmup:g} s of warm-up; real Flickr8k val "
            f"captions, k = 10; latency is the client's, request to answer. The index holds "
            f"the Flickr8k images encoded by the shipped model plus random vectors up to "
            f'{args.gallery:,}. "batch" is the mean number of text queries the server encoded '
            "together (from /metrics). Reproduce: `python benchmarks/serve_load.py`.",
            "",
            table(
                [
                    "setting",
                    "clients",
                    "requests",
                    "queries/s",
                    "p50 ms",
                    "p99 ms",
                    "batch",
                    "errors",
                ],
                rows,
            ),
            "",
            f"While adding: {adds.get('added', 0)} images added one per request (median "
            f"{adds.get('p50', float('nan')):.0f} ms per add, {adds.get('failures', 0)} failed), "
            "during the last row's queries.",
        ]
    )
    if not args.no_write:
        write_section("serve-load", body)
    print(body)


if __name__ == "__main__":
    main()
