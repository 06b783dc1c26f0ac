"""Validation AR per epoch of every training run under runs/, with the settings that differ.

Reads each run's `log.jsonl` and the recipe saved in `last/config.json`; runs that were stopped
before their last epoch say so. This is how the shipped recipe's choices were measured.

    python benchmarks/training_curves.py [--runs runs]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from report import table, write_section

ROOT = Path(__file__).resolve().parent.parent


def settings(train: dict) -> str:
    m = train["model"]
    parts = [
        f"pooling={m['text']['pooling']}",
        f"text layers tuned={m['text']['trainable_layers']}",
        f"[IMG]+mean={'yes' if m['image'].get('img_token_adds_mean') else 'no'}",
        f"region_keep={train.get('region_keep', 1.0)}",
        f"pooled view={m.get('pooled_dim', 0) or 'no'}",
    ]
    w = train["objectives"]
    objectives = "+".join(k.upper() for k in ("vmlm", "smrm", "cmr") if w[k])
    if train.get("init_from"):
        objectives += f" from {Path(train['init_from']).parent.name}"
    return f"{objectives}; " + ", ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs")
    args = ap.parse_args()
    rows = []
    for log_path in sorted(args.runs.glob("*/log.jsonl")):
        run = log_path.parent
        cfg_path = run / "last" / "config.json"
        if not cfg_path.is_file():
            continue
        train = json.loads(cfg_path.read_text()).get("train")
        if not train or "objectives" not in train:
            continue  # a re-ranker or `ldot align` run: not a bi-encoder recipe
        log = [json.loads(line) for line in log_path.read_text().splitlines()]
        curve = " ".join(f"{r['val']['ar']:.1f}" for r in log if "val" in r)
        done = f"{len(log)}/{train['epochs']}" + (
            "" if len(log) == train["epochs"] else " (stopped)"
        )
        best = max((r["val"]["ar"] for r in log if "val" in r), default=float("nan"))
        rows.append([run.name, settings(train), done, curve, f"{best:.1f}"])
    body = "\n".join(
        [
            "## Training runs: validation AR after each epoch (Flickr8k val)",
            "",
            "What the recipe choices rest on. Reproduce: `python benchmarks/training_curves.py` "
            "after training (each row's recipe is saved in `runs/NAME/last/config.json`).",
            "",
            table(["run", "settings", "epochs", "val AR per epoch", "best"], rows),
        ]
    )
    write_section("training-curves", body)
    print(body)


if __name__ == "__main__":
    main()
