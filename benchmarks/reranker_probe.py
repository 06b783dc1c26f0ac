"""Can the re-ranker's cross-attention layer learn at all? A sanity probe on easy negatives.

The shipped recipe's loss barely leaves chance on the bi-encoder's mined hard negatives. This
asks whether the same layer, from the same start, can fit 64 Flickr8k val captions each against
its own image and 3 random others (an easy task), trained alone on the cross logit. If it can,
the trouble is the hard negatives, not the gradients.

    python benchmarks/reranker_probe.py [--steps 40] [--lr 3e-4]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from report import commit, machine, table, write_section

from lightningdot.config import DataConfig, RerankerConfig
from lightningdot.features import FeatureStore
from lightningdot.model.checkpoint import load_model
from lightningdot.model.reranker import Reranker
from lightningdot.training.data import load_split

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/flickr8k")
    ap.add_argument("--features", type=Path, default=ROOT / ".cache/features/flickr8k-lite2")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=3e-4)
    args = ap.parse_args()

    torch.manual_seed(0)
    bi = load_model("default")
    data_cfg = DataConfig(str(args.data / "dataset_flickr8k.json"), str(args.features))
    val = load_split(data_cfg, "val", FeatureStore(args.features), soft_labels=False)
    n = args.pairs
    reranker = Reranker(bi, RerankerConfig(num_layers=1))
    reranker.init_pretrained()
    reranker.train()
    states, masks = reranker.image_states(val.regions.select(torch.arange(n)))
    ts, tm = reranker.text_states([val.corpus.images[i].captions[0] for i in range(n)])
    gen = torch.Generator().manual_seed(0)
    others = [
        torch.tensor([j for j in torch.randperm(n, generator=gen).tolist() if j != i][:3])
        for i in range(n)
    ]
    cand = torch.cat([torch.arange(n)[:, None], torch.stack(others)], 1)  # own image first
    optimizer = torch.optim.AdamW(
        [p for p in reranker.cross.parameters() if p.requires_grad], lr=args.lr
    )
    rows = []
    for step in range(args.steps):
        logits = reranker.cross_scores(
            (ts.repeat_interleave(4, 0), tm.repeat_interleave(4, 0)),
            (states[cand.flatten()], masks[cand.flatten()]),
        ).view(n, 4)
        loss = torch.nn.functional.cross_entropy(logits, torch.zeros(n, dtype=torch.long))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 8 == 0 or step == args.steps - 1:
            rows.append([str(step), f"{loss.item():.3f}"])
            print(rows[-1], flush=True)

    body = "\n".join(
        [
            "## Re-ranker sanity probe: one cross-attention layer on easy negatives",
            "",
            f"Machine: {machine()}; commit {commit()}. {n} Flickr8k val captions, each against "
            f"its own image and 3 random others, the shipped re-ranker's layer trained from its "
            f"start on the cross logit alone (AdamW, lr {args.lr:g}). Chance is "
            f"ln 4 = {math.log(4):.3f}. Reproduce: `python benchmarks/reranker_probe.py`.",
            "",
            table(["step", "ITM loss"], rows),
        ]
    )
    write_section("reranker-probe", body)
    print(body)


if __name__ == "__main__":
    main()
