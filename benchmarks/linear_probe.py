"""The floor: frozen mean-pooled image features and frozen mean-pooled MiniLM, a linear head each.

python benchmarks/linear_probe.py --data ../shared/data/flickr8k --features .cache/features/flickr8k-lite2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from lightningdot.data import read_karpathy
from lightningdot.evaluation.metrics import recall_metrics
from lightningdot.features import FeatureStore
from lightningdot.model.pretrained import quiet_transformers, text_model_dir
from lightningdot.training.objectives import cmr_loss


@torch.inference_mode()
def minilm_mean(texts: list[str], batch: int = 256) -> torch.Tensor:
    """Frozen all-MiniLM-L6-v2 sentence embeddings (mean pooling, as it was trained)."""
    folder = text_model_dir("all-minilm-l6-v2")
    with quiet_transformers():
        tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding per batch
    out = torch.empty(len(texts), model.config.hidden_size)
    for s in range(0, len(texts), batch):
        idx = order[s : s + batch]
        enc = tok(
            [texts[i] for i in idx],
            padding=True,
            truncation=True,
            max_length=40,
            return_tensors="pt",
        )
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        out[idx] = (h * m).sum(1) / m.sum(1)
    return out


def mean_regions(store: FeatureStore, keys: list[str]) -> torch.Tensor:
    b = store.batch(keys)
    m = b.mask.unsqueeze(-1).float()
    return (b.features.float() * m).sum(1) / m.sum(1)


def run_probe(annotations: Path, features: Path, epochs: int = 10, seed: int = 0) -> dict:
    """Train the probe, evaluating on val after every epoch; the best epoch's metrics (the
    same selection on val as the LightningDOT runs' `best` checkpoints), with "epoch" added."""
    torch.manual_seed(seed)
    store = FeatureStore(features)
    train, val = read_karpathy(annotations, "train"), read_karpathy(annotations, "val")
    img_tr, img_va = mean_regions(store, train.keys()), mean_regions(store, val.keys())
    txt_tr, txt_va = minilm_mean(train.captions), minilm_mean(val.captions)
    cap_img = torch.tensor(train.caption_image)
    mu, sd = img_tr.mean(0), img_tr.std(0) + 1e-6
    img_tr, img_va = (img_tr - mu) / sd, (img_va - mu) / sd
    dim = 256
    w_img, w_txt = torch.nn.Linear(img_tr.shape[1], dim), torch.nn.Linear(txt_tr.shape[1], dim)
    scale = torch.nn.Parameter(torch.tensor(float(torch.log(torch.tensor(1 / 0.05)))))
    params = [*w_img.parameters(), *w_txt.parameters(), scale]
    # A low rate: at 1e-3 the heads peak after one epoch and then overfit fast.
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    best: dict = {"ar": -1.0}
    # Every caption is a training pair each epoch; a batch of 128 of the 30,000 rarely holds two
    # captions of one image, so in-batch negatives are (almost always) true negatives.
    for epoch in range(epochs):
        order = torch.randperm(len(cap_img))
        for s in range(0, len(order) - 127, 128):
            cap = order[s : s + 128]
            t = F.normalize(w_txt(txt_tr[cap]), dim=-1)
            i = F.normalize(w_img(img_tr[cap_img[cap]]), dim=-1)
            losses = cmr_loss(t, i, scale)
            loss = (losses["cmr_t2i"] + losses["cmr_i2t"]) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            t = F.normalize(w_txt(txt_va), dim=-1)
            i = F.normalize(w_img(img_va), dim=-1)
        metrics = recall_metrics(t, i, val.caption_image)
        if metrics["ar"] > best["ar"]:
            best = metrics | {"epoch": epoch + 1}
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/flickr8k"))
    ap.add_argument("--features", type=Path, default=Path(".cache/features/flickr8k-lite2"))
    args = ap.parse_args()
    print(json.dumps(run_probe(args.data / "dataset_flickr8k.json", args.features), indent=1))


if __name__ == "__main__":
    main()
