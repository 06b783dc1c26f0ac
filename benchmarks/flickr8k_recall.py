"""Recall on Flickr8k val: the linear-probe floor, the paper's ablation, and the shipped model.

Rows:
  * linear probe: frozen mean-pooled EfficientNet-Lite2 regions and frozen mean-pooled MiniLM,
    a linear head each, InfoNCE (trained here, in the same run; like every trained row, the
    epoch with the best val AR is reported);
  * LightningDOT, CMR fine-tuning alone (recipes/finetune-cmr.toml);
  * LightningDOT, VMLM + SMRM + CMR pre-training then CMR fine-tuning
    (recipes/pretrain.toml, then recipes/finetune-after-pretrain.toml);
  * the shipped default model.
Training runs resume from (or skip when finished in) runs/<recipe>; each best checkpoint is
re-evaluated here rather than read back from its log. Also reports training throughput, time per
epoch and peak memory from the runs' logs.

    python benchmarks/flickr8k_recall.py [--data ../shared/data/flickr8k] [--skip-training]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from report import commit, machine, table, write_section

from lightningdot.checkpoint import load_model
from lightningdot.config import TrainConfig, load_config
from lightningdot.data import read_karpathy
from lightningdot.evaluate import RetrievalEvaluator, store_batches
from lightningdot.features import FeatureStore, create_backbone
from lightningdot.features.extract import extract_images
from lightningdot.train import train

sys.path.insert(0, str(Path(__file__).parent))
from linear_probe import run_probe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
STAGES = [  # (run name, recipe, row label or None for a stage that is not a row)
    ("finetune-cmr", "finetune-cmr.toml", "LightningDOT, CMR fine-tuning only"),
    ("pretrain", "pretrain.toml", None),
    (
        "finetune-after-pretrain",
        "finetune-after-pretrain.toml",
        "LightningDOT, VMLM+SMRM+CMR pre-training, then CMR fine-tuning",
    ),
]


def fmt(m: dict) -> list[str]:
    return [f"{m[d][k]:.1f}" for d in ("t2i", "i2t") for k in ("r1", "r5", "r10")] + [
        f"{m['ar']:.1f}"
    ]


def run_stats(run: Path) -> str:
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    pairs = statistics.median(r["pairs_per_s"] for r in log)
    secs = statistics.median(r["seconds"] for r in log)
    peak = max(r["peak_rss_mb"] for r in log)
    return f"{len(log)} | {pairs:.1f} | {secs:.0f} | {peak:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/flickr8k")
    ap.add_argument("--features", type=Path, default=ROOT / ".cache/features/flickr8k-lite2")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs")
    ap.add_argument("--skip-training", action="store_true", help="only evaluate finished runs")
    args = ap.parse_args()
    annotations = args.data / "dataset_flickr8k.json"

    # Features: extracted once (resumable); a no-op when the store is complete.
    corpus_all = read_karpathy(annotations)
    items = [(k, args.data / "images" / k) for k in corpus_all.keys()]
    extract_images(items, args.features, create_backbone("efficientnet-lite2"))
    store = FeatureStore(args.features)

    val = read_karpathy(annotations, "val")
    evaluator = RetrievalEvaluator(val, lambda: store_batches(store, val.keys()))
    rows, stats = [], []
    probe = run_probe(annotations, args.features)
    rows.append(
        [
            f"linear probe (frozen mean-pooled features, linear heads; val-best epoch {probe['epoch']} of 10)",
            *fmt(probe),
        ]
    )
    print("probe", json.dumps(probe), flush=True)

    for name, recipe, label in STAGES:
        run = args.runs / name
        if not args.skip_training:
            cfg = load_config(TrainConfig, RECIPES / recipe)
            train(cfg, run)
        if not (run / "best").exists():
            print(f"skipping {name}: no finished run in {run}", flush=True)
            continue
        stats.append([name, run_stats(run)])
        if label is None:
            continue
        metrics = evaluator(load_model(run / "best"))
        rows.append([label, *fmt(metrics)])
        print(name, json.dumps(metrics), flush=True)

    shipped = evaluator(load_model("default"))
    rows.append(["shipped `default` model", *fmt(shipped)])

    header = ["model", "t2i R@1", "R@5", "R@10", "i2t R@1", "R@5", "R@10", "AR"]
    body = [
        "## Flickr8k val retrieval (1,000 images, 5,000 captions)",
        "",
        f"Machine: {machine()}; commit {commit()}. "
        "Reproduce: `python benchmarks/flickr8k_recall.py` (trains what is not trained yet).",
        "",
        table(header, rows),
        "",
        "Training cost per run (medians over epochs; peak resident memory of the training process):",
        "",
        "| run | epochs | pairs/s | s/epoch | peak RSS MB |",
        "|---|---|---|---|---|",
        *[f"| {n} | {s} |" for n, s in stats],
    ]
    write_section("flickr8k-recall", "\n".join(body))


if __name__ == "__main__":
    main()
