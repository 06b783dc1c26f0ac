"""English and Chinese retrieval on Flickr8k val, with the English-only and multilingual models.

Both models search the same image vectors: `multilingual` keeps the image encoder of
`default` (`ldot align`, recipes/multilingual.toml). English captions are Flickr8k's; Chinese
captions are Flickr8k-CN's, written by native speakers for the same images (not translated).
Protocol as `ldot evaluate`: 1,000 images, 5 captions each per language. Also the time to encode
one text query (median of 50, after a warm-up) and the training run's cost from its log.

    python benchmarks/multilingual.py [--model multilingual] [--run runs/multilingual]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from report import commit, machine, table, write_section

from lightningdot.data import read_karpathy
from lightningdot.encode import RegionSource, encode_collection, encode_texts
from lightningdot.evaluation.metrics import recall_metrics
from lightningdot.features import FeatureStore
from lightningdot.model.checkpoint import load_model

ROOT = Path(__file__).resolve().parent.parent
LANGUAGES = [("English", "dataset_flickr8k.json"), ("Chinese", "dataset_flickr8kcn.json")]


def query_ms(model, query: str, n: int = 50) -> float:
    with torch.inference_mode():
        model.encode_text([query])
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            model.encode_text([query])
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/flickr8k")
    ap.add_argument("--features", type=Path, default=ROOT / ".cache/features/flickr8k-lite2")
    ap.add_argument("--model", default="multilingual")
    ap.add_argument("--run", type=Path, default=ROOT / "runs/multilingual")
    args = ap.parse_args()

    store = FeatureStore(args.features)
    rows, ars = [], {}
    for name in ("default", args.model):
        model = load_model(name)
        images = None
        for lang, file in LANGUAGES:
            corpus = read_karpathy(args.data / file, "val")
            if images is None:  # the same images, in the same order, in both files
                images = encode_collection(
                    model, RegionSource(model.cfg.backbone, store), corpus.keys()
                )
            text = encode_texts(model, corpus.captions)
            rankings = [("dot + prior", model.bank), ("dot only", None)] if model.bank else []
            for ranking, bank in rankings or [("dot only", None)]:
                m = recall_metrics(text, images, corpus.caption_image, bank)
                ars[name, lang, ranking] = m["ar"]
                rows.append(
                    [name, lang, ranking]
                    + [f"{m[d][k]:.1f}" for d in ("t2i", "i2t") for k in ("r1", "r5", "r10")]
                    + [f"{m['ar']:.1f}"]
                )
                print(rows[-1], flush=True)
        ms = {
            "English": query_ms(model, "a dog runs on the grass"),
            "Chinese": query_ms(model, "一只狗在草地上奔跑"),
        }
        for row in rows:
            if row[0] == name:
                row.append(f"{ms[row[1]]:.1f}")

    shipped = "dot + prior" if (args.model, "English", "dot + prior") in ars else "dot only"
    en, zh = ars[args.model, "English", shipped], ars[args.model, "Chinese", shipped]
    en_default = ars["default", "English", shipped]
    lines = [
        "## Multilingual retrieval (Flickr8k val: English and native Chinese captions)",
        "",
        f"Machine: {machine()}; commit {commit()}. 1,000 images, 5,000 captions per language; "
        "English captions from Flickr8k, Chinese from Flickr8k-CN (written by native speakers "
        f"for the same images, not translations). `{args.model}` keeps the image encoder of "
        "`default`, so both search the same image vectors and index. Query ms: encoding one "
        "query of that language (median of 50). "
        "Reproduce: `python benchmarks/multilingual.py`.",
        "",
        table(
            [
                "model",
                "captions",
                "ranking",
                "t2i R@1",
                "R@5",
                "R@10",
                "i2t R@1",
                "R@5",
                "R@10",
                "AR",
                "query ms",
            ],
            rows,
        ),
        "",
        f"- Chinese AR / English AR of `{args.model}`, {shipped} (as shipped): {zh / en:.3f} "
        "(target >= 0.90).",
        f"- English AR, `{args.model}` - `default`, {shipped}: {en - en_default:+.2f} "
        "(target: no more than 2 points below).",
        "- `dot + prior` ranks with the query-bank prior (`multilingual` loads `default`'s "
        "bank with its image encoder, so the priors in an index `default` built are its own); "
        "`dot only` is `ldot evaluate --no-prior`.",
        "- No other language is measured: the data here has no honest captions in a third "
        "language, and machine-translated ones would measure the translator as much as the model.",
    ]
    log_path = args.run / "log.jsonl"
    if log_path.is_file():
        log = [json.loads(x) for x in log_path.read_text().splitlines()]
        lines.append(
            f"- Training (`ldot align recipes/multilingual.toml`): {len(log)} epochs, median "
            f"{statistics.median(r['seconds'] for r in log):.0f} s per epoch "
            f"({statistics.median(r['images_per_s'] for r in log):.0f} images/s, each with one "
            f"caption per language), peak RSS {max(r['peak_rss_mb'] for r in log) / 1024:.1f} GB."
        )
    body = "\n".join(lines)
    write_section("multilingual", body)
    print(body)


if __name__ == "__main__":
    main()
