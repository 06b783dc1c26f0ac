"""An object-centric retrieval set from Debian's `openclipart-png` (Open Clip Art Library, 0.18,
public domain): one caption per picture, made from its file name, in the Karpathy layout.

The package's files are named `title_author_NN.png` inside topic folders (`animals/birds`,
`food`, `tools`, ...). A caption is the title's English words: the name split at `_` and `-`,
each token kept if it is a lower-case entry of the system word list (`wamerican`), so that
Italian titles, author names (capitalised there) and numbers fall away; "A " + the words +
".". Author names that are also English words slip through (`dan`, `van`); one token names
it, so the script drops the tokens that end the names of many files in several folders. Only
topic folders of things (animals, food, plants, tools, transportation, ...) are read; icons,
shapes, signs (road signs and AIGA symbols among the transport pictures), flags and maps are
left out, and so are the few pictures larger than the project reads (`MAX_PIXELS`). A caption
kept by several pictures keeps the first (in path order), so that every query has one right
answer. Each picture is `train` or `val` by
a hash of its caption: val is the held-out half, train is there to fit what needs fitting.

    apt-get download openclipart-png && dpkg-deb -x openclipart-png_*.deb clipart
    apt-get install wamerican
    python benchmarks/clipart_set.py --root clipart/usr/share/openclipart/png \\
        --out .cache/clipart/dataset_clipart.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import warnings
from collections import Counter
from pathlib import Path

from PIL import Image

from lightningdot.features.backbones import MAX_PIXELS

TOPICS = (
    "animals", "buildings", "containers", "decorations", "education", "electronics", "food",
    "office", "people", "plants", "recreation", "science", "tools", "transportation",
)  # fmt: skip
SIGNS = ("roadsigns", "aiga-symbols")


def english_words(path: Path = Path("/usr/share/dict/words")) -> set[str]:
    return {w for w in path.read_text(errors="ignore").split() if w.isalpha() and w.islower()}


def tokens(stem: str) -> list[str]:
    return [t for t in re.split(r"[_\-\s]+", stem.lower()) if t.isalpha()]


def author_words(files: list[Path]) -> set[str]:
    """Tokens that end the names of 5+ files in 2+ folders: authors, not things."""
    ends: dict[str, set[str]] = {}
    count: Counter[str] = Counter()
    for f in files:
        t = tokens(f.stem)
        if len(t) > 1:
            ends.setdefault(t[-1], set()).add(f.parent.name)
            count[t[-1]] += 1
    return {w for w, n in count.items() if n >= 5 and len(ends[w]) >= 2}


def too_large(f: Path) -> bool:
    with Image.open(f) as im:  # the header only
        return im.width * im.height > MAX_PIXELS


def split_of(caption: str) -> str:
    return "val" if hashlib.sha256(caption.encode()).digest()[0] % 2 else "train"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="the package's png/ folder")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # `too_large` checks sizes
    words = english_words()
    files = sorted(
        f for t in TOPICS for f in (args.root / t).rglob("*.png") if f.parent.name not in SIGNS
    )
    authors = author_words(files)
    images, seen = [], set()
    for f in files:
        kept = [t for t in tokens(f.stem) if t in words and t not in authors and len(t) > 2]
        caption = "A " + " ".join(kept) + "." if kept else ""
        if not caption or caption in seen or too_large(f):
            continue
        seen.add(caption)
        rel = f.relative_to(args.root)
        sentence = {"raw": caption, "tokens": caption.lower().strip(".").split()}
        images.append(
            {"filepath": str(rel.parent), "filename": rel.name, "split": split_of(caption),
             "sentences": [sentence]}
        )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"dataset": "openclipart", "images": images}))
    n = Counter(i["split"] for i in images)
    print(f"{len(images)} pictures ({n['train']} train, {n['val']} val) of {len(files)} files")


if __name__ == "__main__":
    main()
