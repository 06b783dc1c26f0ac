"""Validation AR per epoch of every training run under runs/, with the settings that differ:
bi-encoders, re-rankers and multilingual students, one table each.

Reads each run's `log.jsonl` and the recipe saved in `last/config.json`; runs that were stopped
before their last epoch say so. This is how the shipped recipe's choices were measured.

    python benchmarks/training_curves.py [--runs runs]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from report import table, write_section

from lightningdot.config import AlignConfig, TrainConfig

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


def reranker_settings(train: dict) -> str:
    return (
        f"{train['reranker']['num_layers']} layer(s), "
        f"{train['negatives']} negatives from top {train['mine_from']}, "
        f"region_keep={train.get('region_keep', 1.0)}, lr={train['loop']['lr']}"
        + (", bf16" if train["loop"].get("bf16") else "")
    )


def align_settings(align: dict) -> str:
    return (
        f"{align['text']['pretrained']}, {align['text']['trainable_layers']} layers tuned, "
        f"distill={align['distill']}, cross_distill={align.get('cross_distill', 0)}"
        + (", bf16" if align["loop"].get("bf16") else "")
    )


def epochs_done(log: list[dict], epochs: int) -> str:
    return f"{len(log)}/{epochs}" + ("" if len(log) == epochs else " (stopped)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs")
    args = ap.parse_args()
    bi_rows, reranker_rows, align_rows = [], [], []
    for log_path in sorted(args.runs.glob("*/log.jsonl")):
        run = log_path.parent
        cfg_path = run / "last" / "config.json"
        if not cfg_path.is_file():
            continue
        saved = json.loads(cfg_path.read_text())
        log = [json.loads(line) for line in log_path.read_text().splitlines()]
        log_val = [r for r in log if "val" in r]
        best = max((r["val"]["ar"] for r in log_val), default=float("nan"))
        if "align" in saved:  # `ldot align`: AR per language
            align = AlignConfig.upgrade(saved["align"])  # runs saved before `[loop]` too
            langs = [Path(a).stem for a in align["annotations"]]
            curves = [
                " ".join(f"{r['val']['languages'][lang]['ar']:.1f}" for r in log_val)
                for lang in langs
            ]
            done = epochs_done(log, align["loop"]["epochs"])
            for lang, curve in zip(langs, curves, strict=True):
                align_rows.append([run.name, align_settings(align), lang, done, curve])
            continue
        if not saved.get("train"):
            continue
        train = TrainConfig.upgrade(saved["train"])
        curve = " ".join(f"{r['val']['ar']:.1f}" for r in log_val)
        done = epochs_done(log, train["loop"]["epochs"])
        if "reranker" in saved:  # AR after re-ranking the top K, at the fusion chosen on val
            curve = " ".join(
                f"{r['val']['ar']:.1f} ({r.get('fusion', saved['reranker']['fusion']):g})"
                for r in log_val
            )
            reranker_rows.append([run.name, reranker_settings(train), done, curve, f"{best:.1f}"])
        else:
            bi_rows.append([run.name, settings(train), done, curve, f"{best:.1f}"])
    body = "\n".join(
        [
            "## Training runs: validation AR after each epoch (Flickr8k val)",
            "",
            "What the recipe choices rest on. Reproduce: `python benchmarks/training_curves.py` "
            "after training (each row's recipe is saved in `runs/NAME/last/config.json`).",
            "",
            "Bi-encoders (`ldot finetune`, `ldot pretrain`):",
            "",
            table(["run", "settings", "epochs", "val AR per epoch", "best"], bi_rows),
            "",
            "Re-rankers (`ldot train-reranker`): AR after re-ranking the top 16, with the fusion "
            "weight chosen on val in brackets.",
            "",
            table(
                ["run", "settings", "epochs", "val AR per epoch (fusion)", "best"], reranker_rows
            ),
            "",
            "Multilingual students (`ldot align`): AR per caption language.",
            "",
            table(["run", "settings", "captions", "epochs", "val AR per epoch"], align_rows),
        ]
    )
    write_section("training-curves", body)
    print(body)


if __name__ == "__main__":
    main()
