"""Retrieval in six languages on Flickr8k val, with the English-only and multilingual models.

Every model searches the image vectors its own image encoder makes (`multilingual` keeps the
image encoder of `default`, so those two search the same index). The captions of each language
are those of its annotation file, on the val images it covers; the protocol is `ldot
evaluate`'s (R@1/5/10 both ways, AR, the query-bank prior when the model has one).

Like with like: German, French and Czech cover 934 of the 1,000 val images, and French and
Czech have one caption per image, which makes image->text harder. So English is also measured
on those 934 images with its five captions, and with one caption per image (the mean over
the five choices of which one). Also each training run's cost from its log.

    python benchmarks/multilingual.py [--models default multilingual ...] [--run runs/multilingual]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from report import commit, machine, table, write_section

from lightningdot.data import Corpus, ImageRecord, read_karpathy
from lightningdot.encode import RegionSource, encode_collection, encode_texts
from lightningdot.evaluation.metrics import recall_metrics
from lightningdot.features import FeatureStore
from lightningdot.model.checkpoint import load_model

ROOT = Path(__file__).resolve().parent.parent
# (name, annotation file)
LANGUAGES = [
    ("English", "dataset_flickr8k.json"),
    ("Chinese", "dataset_flickr8kcn.json"),
    ("German", "dataset_flickr8k_de.json"),
    ("Portuguese", "dataset_flickr8k_pt.json"),
    ("French", "dataset_flickr8k_fr.json"),
    ("Czech", "dataset_flickr8k_cs.json"),
]
SUBSET = "English, de/fr/cs images"
ONE_CAPTION = "English, 1 caption, de/fr/cs images"
METRICS = [(d, k) for d in ("t2i", "i2t") for k in ("r1", "r5", "r10")]
# language -> the English row it is compared with, and the target ratio of the shipped model
TARGETS = {
    "German": (SUBSET, 0.90),
    "Portuguese": ("English", 0.90),
    "French": (ONE_CAPTION, 0.90),
    "Czech": (ONE_CAPTION, 0.90),
    "Chinese": ("English", 0.75),
}


def mean_metrics(runs: list[dict]) -> dict:
    out = {d: {k: statistics.mean(m[d][k] for m in runs) for _, k in METRICS} for d, _ in METRICS}
    return out | {"ar": statistics.mean(m["ar"] for m in runs)}


def corpora(data: Path) -> dict[str, Corpus]:
    """Every caption set measured: one per language, and English on the subsets."""
    sets = {name: read_karpathy(data / file, "val") for name, file in LANGUAGES}
    covered = set(sets["French"].keys())
    english = [im for im in sets["English"].images if im.key in covered]
    sets[SUBSET] = Corpus(english)
    for j in range(5):
        sets[f"{ONE_CAPTION} #{j}"] = Corpus(
            [ImageRecord(im.key, [im.captions[j]]) for im in english]
        )
    return sets


def measure(name: str, store: FeatureStore, sets: dict[str, Corpus]) -> dict[str, dict]:
    """Metrics of one model on every caption set (the five one-caption sets as their mean)."""
    model = load_model(name)
    keys = sets["English"].keys()
    images = encode_collection(model, RegionSource.of(model, store), keys)
    row = {k: i for i, k in enumerate(keys)}
    out = {}
    for label, corpus in sets.items():
        text = encode_texts(model, corpus.captions).float()
        at = torch.tensor([row[k] for k in corpus.keys()])
        queries = model.as_query(text, "text"), model.as_query(images[at], "image")
        out[label] = recall_metrics(text, images[at], corpus.caption_image, model.bank, queries)
        print(name, label, f"{out[label]['ar']:.2f}", flush=True)
    picks = [out.pop(f"{ONE_CAPTION} #{j}") for j in range(5)]
    out[ONE_CAPTION] = mean_metrics(picks)
    return out


def training_line(run: Path) -> str | None:
    log_path = run / "log.jsonl"
    if not log_path.is_file():
        return None
    log = [json.loads(x) for x in log_path.read_text().splitlines()]
    return (
        f"- Training `{run}`: {len(log)} epochs, median "
        f"{statistics.median(r['seconds'] for r in log):.0f} s per epoch "
        f"({statistics.median(r['images_per_s'] for r in log):.0f} images/s, each with one "
        f"caption per language), peak RSS {max(r['peak_rss_mb'] for r in log) / 1024:.1f} GB."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/flickr8k")
    ap.add_argument("--features", type=Path, default=ROOT / ".cache/features/flickr8k-lite2")
    ap.add_argument("--models", nargs="+", default=["default", "multilingual"])
    ap.add_argument("--shipped", default="multilingual", help="the model the targets are for")
    ap.add_argument("--run", type=Path, nargs="*", default=[ROOT / "runs/multilingual"])
    args = ap.parse_args()

    store, sets = FeatureStore(args.features), corpora(args.data)
    results = {name: measure(name, store, sets) for name in args.models}
    labels = [lang for lang, _ in LANGUAGES[:1]] + [SUBSET, ONE_CAPTION]
    labels += [lang for lang, _ in LANGUAGES[1:]]
    rows = []
    for name, per in results.items():
        for label in labels:
            m = per[label]
            images = len(sets[label if label != ONE_CAPTION else f"{ONE_CAPTION} #0"].images)
            rows.append(
                [name, label, f"{images:,}"]
                + [f"{m[d][k]:.1f}" for d, k in METRICS]
                + [f"{m['ar']:.1f}"]
            )
    header = ["model", "captions", "images", "t2i R@1", "R@5", "R@10", "i2t R@1", "R@5", "R@10"]
    shipped = results[args.shipped]
    lines = [
        "## Multilingual retrieval (Flickr8k val, six languages)",
        "",
        f"Machine: {machine()}; commit {commit()}. Flickr8k val, dot product + the query-bank "
        "prior, as `ldot evaluate`. English from Flickr8k; Chinese from Flickr8k-CN, German "
        "(Multi30k task 2) and Portuguese (Framed Multi30K) written by native speakers for the "
        "images; French and Czech: one professional translation per image (Multi30k task 1). "
        "German, French and Czech cover 934 of the 1,000 images, so English is also given on "
        "those 934, with its 5 captions and with 1 per image (the mean over the 5 choices of "
        "which): image->text with one caption per image is harder. `multilingual` keeps the "
        "image encoder of `default`: both search the same index. Reproduce: `python benchmarks/multilingual.py`.",
        "",
        table(header + ["AR"], rows),
        "",
        f"Targets, `{args.shipped}`:",
        "",
    ]
    for lang, (base, target) in TARGETS.items():
        ratio = shipped[lang]["ar"] / shipped[base]["ar"]
        lines.append(
            f"- {lang} AR / {base} AR: {ratio:.3f} (target >= {target:.2f}): "
            + ("met" if ratio >= target else "missed")
        )
    gap = shipped["English"]["ar"] - results["default"]["English"]["ar"]
    lines.append(
        f"- English AR, `{args.shipped}` - `default`: {gap:+.2f} (target >= -1): "
        + ("met" if gap >= -1 else "missed")
    )
    lines += [line for run in args.run if (line := training_line(run))]
    body = "\n".join(lines)
    write_section("multilingual", body)
    print(body)


if __name__ == "__main__":
    main()
