"""Recall on Flickr8k val: the linear-probe floor, the paper's ablation, and the shipped model.

Rows:
  * linear probe: frozen mean-pooled EfficientNet-Lite2 regions and frozen mean-pooled MiniLM,
    a linear head each, InfoNCE (trained here, in the same run; like every trained row, the
    epoch with the best val AR is reported);
  * LightningDOT, CMR fine-tuning alone, transformer and pooled views (recipes/finetune-cmr.toml);
  * the paper's ablation, on the transformer view alone: CMR fine-tuning alone
    (recipes/ablations/cmr-transformer-view.toml) against VMLM + SMRM + CMR pre-training then
    CMR fine-tuning (recipes/pretrain.toml, then recipes/finetune-after-pretrain.toml);
  * the shipped default model: each view alone, both, and both with its query-bank prior, and
    the prior at other inverse temperatures (the bank is the shipped one; beta is the one knob).
Training runs resume from (or skip when finished in) runs/<recipe>; each best checkpoint is
re-evaluated here rather than read back from its log. Also reports training throughput, time per
epoch and peak memory from the runs' logs.

    python benchmarks/flickr8k_recall.py [--data ../shared/data/flickr8k] [--skip-training]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from report import commit, machine, table, write_section

from lightningdot.config import TrainConfig, load_config
from lightningdot.data import Corpus, read_karpathy
from lightningdot.encode import RegionSource, encode_collection, encode_texts
from lightningdot.evaluation.evaluate import evaluate_model
from lightningdot.evaluation.metrics import recall_metrics
from lightningdot.features import FeatureStore, create_backbone
from lightningdot.features.extract import extract_images
from lightningdot.model.checkpoint import load_model
from lightningdot.model.encoders import BiEncoder
from lightningdot.training.pretrain import train

sys.path.insert(0, str(Path(__file__).parent))
from linear_probe import run_probe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
STAGES = [  # (run name, recipe, row label or None for a stage that is not a row)
    ("finetune-cmr", "finetune-cmr.toml", "LightningDOT, CMR fine-tuning only (both views)"),
    (
        "cmr-transformer-view",
        "ablations/cmr-transformer-view.toml",
        "LightningDOT, transformer view only: CMR fine-tuning only",
    ),
    ("pretrain", "pretrain.toml", None),
    (
        "finetune-after-pretrain",
        "finetune-after-pretrain.toml",
        "LightningDOT, transformer view only: VMLM+SMRM+CMR pre-training, then CMR fine-tuning",
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


@torch.inference_mode()
def shipped_rows(model: BiEncoder, val: Corpus, store: FeatureStore) -> list[list[str]]:
    """The shipped model by view, and with its prior at several inverse temperatures."""
    text = encode_texts(model, val.captions)
    image = encode_collection(model, RegionSource(model.cfg.backbone, store), val.keys())
    cut = model.cfg.embed_dim
    views = {"transformer view": slice(0, cut), "pooled view": slice(cut, None)}
    rows = []
    if model.cfg.pooled_dim:
        for name, part in views.items():
            t, i = F.normalize(text[:, part], dim=-1), F.normalize(image[:, part], dim=-1)
            rows.append(
                [f"shipped `default`, {name} alone", *fmt(recall_metrics(t, i, val.caption_image))]
            )
    plain = recall_metrics(text, image, val.caption_image)
    rows.append(["shipped `default`, dot product (no prior)", *fmt(plain)])
    bank = model.bank
    if bank is not None:
        for beta in sorted({5.0, 10.0, 20.0, bank.beta}):
            m = recall_metrics(text, image, val.caption_image, dataclasses.replace(bank, beta=beta))
            label = f"shipped `default`, dot product + query-bank prior, beta {beta:g}"
            if beta == bank.beta:
                label = f"**{label} (as shipped)**"
            rows.append([label, *fmt(m)])
    return rows


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
        model = load_model(run / "best")
        model.bank = None  # runs compare by dot product; the prior has rows of its own below
        source = RegionSource(model.cfg.backbone, store)
        metrics = evaluate_model(model, val, source.batches(val.keys()))
        rows.append([label, *fmt(metrics)])
        print(name, json.dumps(metrics), flush=True)

    rows += shipped_rows(load_model("default"), val, store)

    header = ["model", "t2i R@1", "R@5", "R@10", "i2t R@1", "R@5", "R@10", "AR"]
    body = [
        "## Flickr8k val retrieval (1,000 images, 5,000 captions)",
        "",
        f"Machine: {machine()}; commit {commit()}. "
        "Reproduce: `python benchmarks/flickr8k_recall.py` (trains what is not trained yet).",
        "",
        table(header, rows),
        "",
        "The query bank: 2,000 train captions and 2,000 train images encoded by the model "
        "(`ldot bank`); no val data goes into it. Each gallery item's prior, "
        "-(1/beta) log mean_b exp(beta b·g), is stored as one more coordinate of its vector.",
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
