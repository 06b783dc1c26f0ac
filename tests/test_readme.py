"""The README's "Using it" section runs as written: every `ldot` command of its shell blocks,
in order, then its Python examples, in a folder laid out as the README assumes (a checkout
beside `../shared/data/flickr8k`), with a tiny stand-in for Flickr8k made here.

What it skips, and why: `pip install` (the test runs installed), `ldot serve` (it serves until
stopped; tests/serve covers it) and `torchrun` (two processes; tests/training/test_distributed
runs it behind the slow marker). `[--flag value]` marks an optional part and is left out.
"""

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from lightningdot.cli import app

ROOT = Path(__file__).resolve().parents[1]
SKIPPED = ("pip", "torchrun", "ldot serve")
COLOURS = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange", "pink"]
# Enough training images for the re-ranker recipe, which mines each caption's top 16 wrong ones.
N_TRAIN, N_VAL = 18, 4


def using_it() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text[text.index("\n## Using it") : text.index("\n## The model")]


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", using_it(), re.S)


def commands() -> list[list[str]]:
    """The shell blocks' commands as argument lists: continuation lines joined, comments and
    optional `[...]` parts left out."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            args = shlex.split(re.sub(r"\[[^\]]*\]", "", line), comments=True)
            if args and not any(" ".join(args).startswith(s) for s in SKIPPED):
                out.append(args)
    return out


def karpathy(images: list[tuple[str, str]], captions) -> dict:
    entries = []
    for i, (name, colour) in enumerate(images):
        split = "train" if i < N_TRAIN else "val"
        sentences = [{"raw": c} for c in captions(colour, i)]
        entries.append({"filename": name, "split": split, "sentences": sentences})
    return {"dataset": "flickr8k", "images": entries}


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """`<tmp>/main` with the recipes, beside `<tmp>/shared/data/flickr8k` with a few photos."""
    data = tmp_path / "shared" / "data" / "flickr8k"
    (data / "images").mkdir(parents=True)
    images = []
    for i in range(N_TRAIN + N_VAL):
        colour = COLOURS[i % len(COLOURS)]
        name = f"{i:04d}_{colour}.jpg"
        Image.new("RGB", (64 + 8 * i, 48), colour).save(data / "images" / name)
        images.append((name, colour))
    english = karpathy(images, lambda c, i: [f"a {c} photo number {i}", f"a dog on {c} grass"] * 2)
    chinese = karpathy(images, lambda c, i: [f"第{i}张{c}色的照片", "一只狗在草地上奔跑"])
    german = karpathy(images, lambda c, i: [f"ein {c} Foto Nummer {i}", "ein Hund im Gras"])
    portuguese = karpathy(images, lambda c, i: [f"uma foto {c} número {i}", "um cão na grama"])
    # French and Czech: one caption per image, and not every image (as in Multi30k).
    french = karpathy(images, lambda c, i: [f"une photo {c} numéro {i}"])
    czech = karpathy(images, lambda c, i: [f"{c} fotka číslo {i}"])
    for one in (french, czech):
        del one["images"][0]
    files = {"": english, "cn": chinese, "_de": german, "_pt": portuguese}
    files |= {"_fr": french, "_cs": czech}
    for suffix, captions in files.items():
        text = json.dumps(captions, ensure_ascii=False)
        (data / f"dataset_flickr8k{suffix}.json").write_text(text, encoding="utf-8")
    main = tmp_path / "main"
    shutil.copytree(ROOT / "recipes", main / "recipes")
    (main / "more_photos").mkdir()
    for colour in ("teal", "navy"):
        Image.new("RGB", (40, 40), colour).save(main / "more_photos" / f"{colour}.png")
    Image.new("RGB", (50, 40), "brown").save(main / "photo.jpg")
    return main


def test_the_section_has_what_this_test_runs():
    ran = [" ".join(c[:2]) for c in commands()]
    for command in ("extract", "finetune", "pretrain", "evaluate", "index", "search", "bench"):
        assert f"ldot {command}" in ran
    assert {"ldot align", "ldot train-reranker", "ldot bank", "ldot export"} <= set(ran)
    assert len(blocks("python")) == 2


def test_using_it_runs_as_written(checkout, monkeypatch):
    monkeypatch.chdir(checkout)
    runner = CliRunner()
    for args in commands():
        assert args[0] == "ldot", args
        result = runner.invoke(app, args[1:])
        assert result.exit_code == 0, f"{shlex.join(args)}\n{result.output}"
    assert (checkout / "src/lightningdot/weights/default/model.safetensors").is_file()
    for code in blocks("python"):
        exec(compile(code, "README.md", "exec"), {})
