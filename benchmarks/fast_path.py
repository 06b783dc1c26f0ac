"""The fast path against eager PyTorch on the path a user takes: `ldot index --images DIR`
throughput, and Flickr8k val recall, for each runtime.

1. Indexing: `ldot index --out IDX --images DIR --runtime R` over the first `--count` val
   images (DIR: symlinks to them), timed as one command (process start, model load, decoding,
   encoding, writing). For the ONNX runtimes it runs twice: first with an empty export cache
   (what the first `ldot index` on a machine costs, the export included), then again with the
   cache that run filled (every later run).
2. Recall: `ldot evaluate` on the val split (1,000 images from their files, 5,000 captions)
   with each runtime, in this process: R@1/5/10 both ways and AR.

    python benchmarks/fast_path.py [--count 1000] [--runtimes eager onnx onnx-int8] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import commit, machine, table, write_section

from lightningdot.config import RuntimeConfig
from lightningdot.evaluation.evaluate import evaluate_split

ROOT = Path(__file__).resolve().parent.parent
LDOT = Path(sys.executable).parent / "ldot"


def val_folder(data: Path, count: int, where: Path) -> Path:
    """A folder of symlinks to the first `count` val images."""
    js = json.loads((data / "dataset_flickr8k.json").read_text())
    names = [im["filename"] for im in js["images"] if im["split"] == "val"][:count]
    folder = where / "images"
    folder.mkdir()
    for name in names:
        (folder / name).symlink_to(data / "images" / name)
    return folder


def time_index(images: Path, out: Path, runtime: str, cache: Path) -> float:
    """Wall seconds of one `ldot index` run."""
    env = {**os.environ, "LDOT_CACHE": str(cache)}
    cmd = [str(LDOT), "index", "--out", str(out), "--images", str(images), "--runtime", runtime]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def indexing_rows(images: Path, count: int, runtimes: list[str], work: Path) -> list[list[str]]:
    rows = []
    for runtime in runtimes:
        cache = work / f"cache-{runtime}"
        runs = ["cold cache", "warm cache"] if runtime != "eager" else ["-"]
        for n, label in enumerate(runs):
            seconds = time_index(images, work / f"ix-{runtime}-{n}", runtime, cache)
            rows.append([runtime, label, f"{seconds:.1f}", f"{count / seconds:.1f}"])
            print(rows[-1], flush=True)
    return rows


def recall_rows(data: Path, runtimes: list[str], cache: Path) -> list[list[str]]:
    os.environ["LDOT_CACHE"] = str(cache)
    rows = []
    for runtime in runtimes:
        t0 = time.perf_counter()
        m = evaluate_split(
            data / "dataset_flickr8k.json",
            data / "images",
            "val",
            "default",
            log=lambda _: None,
            runtime=RuntimeConfig(runtime),
        )
        seconds = time.perf_counter() - t0
        t2i, i2t = m["t2i"], m["i2t"]
        recalls = [f"{d[f'r{k}']:.2f}" for d in (t2i, i2t) for k in (1, 5, 10)]
        rows.append([runtime, *recalls, f"{m['ar']:.2f}", f"{seconds:.0f}"])
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/flickr8k")
    ap.add_argument("--count", type=int, default=1000, help="Val images `ldot index` reads.")
    ap.add_argument("--runtimes", nargs="+", default=["eager", "onnx", "onnx-int8"])
    ap.add_argument("--no-recall", dest="recall", action="store_false")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        images = val_folder(args.data, args.count, work)
        index_rows = indexing_rows(images, args.count, args.runtimes, work)
        recalls = recall_rows(args.data, args.runtimes, work / "cache-eval") if args.recall else []

    eager = {r[0]: float(r[3]) for r in index_rows if r[1] in ("-", "warm cache")}
    lines = [
        "## The fast path against eager: indexing a photo folder, and val recall",
        "",
        f"Machine: {machine()}; commit {commit()}. `ldot index --out IDX --images DIR "
        f"--runtime R` over {args.count} Flickr8k val images (a folder of symlinks), timed as "
        "one command: process start, model load, decoding, encoding, writing. An ONNX runtime "
        "runs first with an empty export cache (the export included: what the first run on a "
        "machine costs), then with the cache that run filled. Reproduce: "
        "`python benchmarks/fast_path.py`.",
        "",
        table(["runtime", "run", "seconds", "images/s"], index_rows),
    ]
    if "eager" in eager:
        ratios = ", ".join(
            f"{k} {v / eager['eager']:.1f}x" for k, v in eager.items() if k != "eager"
        )
        lines += ["", f"Speed-up over eager (warm cache): {ratios}."]
    if recalls:
        header = ["runtime", "t2i R@1", "R@5", "R@10", "i2t R@1", "R@5", "R@10", "AR", "seconds"]
        ar = {r[0]: float(r[7]) for r in recalls}
        delta = ", ".join(
            f"{k} {v - ar['eager']:+.2f}" for k, v in ar.items() if k != "eager" and "eager" in ar
        )
        lines += [
            "",
            "Flickr8k val (1,000 images read from their files, 5,000 captions), "
            "`evaluate_split(..., runtime=R)` as `ldot evaluate --runtime R` runs it; seconds: "
            "the whole evaluation, images and captions encoded.",
            "",
            table(header, recalls),
            "",
            f"AR against eager's: {delta}.",
        ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("fast_path", body)


if __name__ == "__main__":
    main()
