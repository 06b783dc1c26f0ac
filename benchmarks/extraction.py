"""Extraction throughput: `extract_images` end to end vs the backbone's own forward pass.

End to end covers decoding, resizing, the forward pass, the per-cell classifier and the
atomic shard writes; the ratio says how much of the time is the network itself.

    python benchmarks/extraction.py [--images ../shared/data/flickr8k/images] [--n 256]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from report import commit, machine, write_section

from lightningdot.features import create_backbone, load_image
from lightningdot.features.extract import extract_images

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=ROOT.parent / "shared/data/flickr8k/images")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    paths = sorted(args.images.glob("*.jpg"))[: args.n]
    backbone = create_backbone("efficientnet-lite2")
    pixels = torch.stack([backbone.preprocess(load_image(p)) for p in paths])

    forward, full = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, len(pixels), args.batch_size):
                backbone.net.extract_features(pixels[s : s + args.batch_size])
        forward.append(len(paths) / (time.perf_counter() - t0))
        out = Path(tempfile.mkdtemp())
        try:
            summary = extract_images(
                [(p.name, p) for p in paths], out / "store", backbone, args.batch_size
            )
        finally:
            shutil.rmtree(out)
        full.append(summary.images_per_second)
    f, e = statistics.median(forward), statistics.median(full)
    body = "\n".join(
        [
            "## Feature extraction throughput (EfficientNet-Lite2, 260 px, 9x9 grid)",
            "",
            f"Machine: {machine()}; commit {commit()}. {len(paths)} Flickr8k images, batch {args.batch_size}, "
            f"median of {args.repeats}. Reproduce: `python benchmarks/extraction.py`.",
            "",
            "| stage | images/s |",
            "|---|---|",
            f"| backbone forward only (`extract_features`, pixels ready) | {f:.1f} |",
            f"| `ldot extract` path (decode + forward + per-cell classifier + shard writes) | {e:.1f} |",
            f"| ratio end-to-end / forward | {e / f:.2f} |",
        ]
    )
    write_section("extraction", body)
    print(body)


if __name__ == "__main__":
    main()
