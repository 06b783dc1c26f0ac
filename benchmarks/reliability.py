"""Reliability of `ldot` and `ldot serve`: what bad input gets, what an OpenAPI fuzzer finds,
what a write killed at each of its file operations leaves, and whether searches and added
images survive adds while the server runs and a hard kill after them.

1. Bad inputs, CLI: hand-made bad invocations of the real `ldot` entry point (subprocesses of
   the one beside this Python), each judged "clear error" (non-zero exit, an `error:` line, no
   traceback), "usage error" (typer's own message for an option out of range, no traceback),
   "traceback", "accepted" (exit 0 where it should fail), "accepted (served)" (`ldot serve`
   came up where it should refuse), "other error message" (non-zero exit, a message but not
   an `error:` line), "unclear failure" (non-zero exit, no message) or "hung". The few
   that should succeed (an image that does not decode, skipped and named; `--json` output that
   must parse) are judged "ok" or "wrong".
2. Bad inputs, HTTP: hand-made bad requests to `ldot serve` on loopback. Every 4xx body should
   be JSON with a "detail"; no body should name the index folder, the data folder, the
   repository or the temporary folder (a "path leak").
3. OpenAPI fuzzer: schemathesis, from its own environment (.cache/fuzz), bounded in examples
   and time; requests and 5xx are counted from the server's /metrics, not from its output.
4. Crash points: `tests/index/crash.py` kills each write to an index folder at every file
   operation in turn, with the tests' tiny model, and judges what each kill left.
5. Concurrent adds: text searches without pause while `ldot index --add` (another process)
   and POST /images add images; then the server is killed (SIGKILL), started again and checked
   for every image added.

Fixtures are small and live in a temporary folder: a Karpathy file of 30 Flickr8k val images
and their index (`ldot index`), 200 for part 5 (from the feature store when there is one), the
tests' tiny model for part 4.

    python benchmarks/reliability.py [--no-write] [--parts cli http fuzz crash concurrent]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx
from PIL import Image
from report import commit, machine, table, write_section
from serve_load import free_port, mirrored_jpeg, start_server

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `tests` is a package of the repository, not an installed one
LDOT = Path(sys.executable).parent / "ldot"
FUZZ = ROOT / ".cache/fuzz/bin/st"
PARTS = ("cli", "http", "fuzz", "crash", "concurrent")
ENV = {**os.environ, "COLUMNS": "200"}  # typer's usage box wraps at the terminal's width


# ---------------------------------------------------------------------------------------------
# What the report shows of a message: temporary and local folders by name, one line, no pipes.


@dataclass
class Places:
    """Absolute folders a report (and a server's answers) should not spell out."""

    names: dict[str, str]  # folder -> the placeholder shown instead

    def hide(self, text: str, limit: int = 110) -> str:
        for where, name in sorted(self.names.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(where, name)
        text = " ".join(text.split()).replace("|", "\\|")
        return text if len(text) <= limit else text[: limit - 3] + "..."

    def leaked(self, body: str) -> list[str]:
        return sorted({name for where, name in self.names.items() if where in body})


def places_of(tmp: Path, data: Path) -> Places:
    names = {}
    for where, name in ((tmp, "$TMP"), (data, "$DATA"), (ROOT, "$REPO")):
        names[str(where)] = name
        names[str(where.resolve())] = name
    return Places(names)


# ---------------------------------------------------------------------------------------------
# Fixtures: a Karpathy file of a few val images and its index, and broken variants of both.


def karpathy(data: Path) -> list[dict]:
    return json.loads((data / "dataset_flickr8k.json").read_text())["images"]


def write_annotations(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps({"dataset": "flickr8k", "images": entries}))
    return path


def link_images(folder: Path, images: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).symlink_to(images / name)
    return folder


def build_with_ldot(out: Path, images: Path, annotations: Path, features: Path | None) -> None:
    args = ["index", "--out", str(out), "--images", str(images)]
    args += ["--annotations", str(annotations), "--split", "val"]
    args += ["--features", str(features)] if features else []
    ran = run_ldot(args, timeout=900)
    if ran.rc != 0:
        raise SystemExit(f"ldot {' '.join(args)} failed:\n{ran.err[-2000:]}")


def bad_annotations(folder: Path, good: list[dict]) -> dict[str, Path]:
    """Annotation files broken in one way each (the first entry, unless the file is)."""
    folder.mkdir()
    files = {"empty": "", "invalid": "{not json", "list": "[]", "no-images": '{"dataset": "x"}'}
    for name, text in files.items():
        (folder / f"{name}.json").write_text(text)
    entry = dict(good[0])
    broken = {
        "filename-int": {**entry, "filename": 123},
        "sentences-str": {**entry, "sentences": "x"},
        "no-filename": {k: v for k, v in entry.items() if k != "filename"},
        "no-split": {k: v for k, v in entry.items() if k != "split"},
        "no-raw": {**entry, "sentences": [{"tokens": ["a"]}]},
        "traversal": {**entry, "filename": "../../etc/passwd"},
        "missing-file": {**entry, "filename": "no_such_image.jpg"},
    }
    paths = {name: folder / f"{name}.json" for name in files}
    for name, first in broken.items():
        paths[name] = write_annotations(folder / f"{name}.json", [first, *good[1:]])
    paths["duplicate"] = write_annotations(folder / "duplicate.json", [entry, entry, *good[1:]])
    return paths


def damaged_indexes(folder: Path, index: Path) -> dict[str, Path]:
    """Copies of an index folder, each damaged in one way."""
    record = json.loads((index / "retriever.json").read_text())
    images = record["parts"]["images"]  # the current image part
    copies = {}

    def copy(name: str) -> Path:
        copies[name] = folder / name
        shutil.copytree(index, copies[name])
        return copies[name]

    (copy("record-garbage") / "retriever.json").write_text("{garbage")
    (copy("record-format-99") / "retriever.json").write_text(json.dumps({**record, "format": 99}))
    missing = {**record, "parts": {**record["parts"], "images": "v99/images"}}
    (copy("part-missing") / "retriever.json").write_text(json.dumps(missing))
    faiss_file = copy("faiss-truncated") / images / "index.faiss"
    os.truncate(faiss_file, faiss_file.stat().st_size // 2)
    (copy("items-garbage") / images / "items.json").write_text("[{")
    items = json.loads((index / images / "items.json").read_text())
    (copy("items-short") / images / "items.json").write_text(json.dumps(items[:-3]))
    return copies


@dataclass
class Fixtures:
    tmp: Path
    data: Path
    images: Path  # Flickr8k's image folder
    annotations: Path  # the Karpathy file of the indexed val images
    index: Path
    few: Path  # three images
    mixed: Path  # three images and a text file named .jpg
    text_only: Path  # only that text file
    empty: Path
    not_index: Path  # a folder of other files
    empty_file: Path
    bad: dict[str, Path]  # annotation files, by what is wrong with them
    damaged: dict[str, Path]  # index folders, likewise
    busy_port: int  # a port another socket listens on


def make_fixtures(tmp: Path, data: Path, size: int, listener: socket.socket) -> Fixtures:
    val = [e for e in karpathy(data) if e["split"] == "val"][:size]
    images = data / "images"
    annotations = write_annotations(tmp / "annotations.json", val)
    index = tmp / "index"
    build_with_ldot(index, images, annotations, None)
    names = [e["filename"] for e in val[:3]]
    mixed = link_images(tmp / "mixed", images, names)
    (mixed / "broken.jpg").write_text("this is text, not a JPEG\n")
    text_only = tmp / "text-only"
    text_only.mkdir()
    shutil.copy(mixed / "broken.jpg", text_only)
    (tmp / "empty").mkdir()
    (tmp / "not-index").mkdir()
    (tmp / "not-index" / "notes.txt").write_text("not an index\n")
    (tmp / "empty.jpg").write_bytes(b"")
    (tmp / "damaged").mkdir()
    return Fixtures(
        tmp=tmp,
        data=data,
        images=images,
        annotations=annotations,
        index=index,
        few=link_images(tmp / "few", images, names),
        mixed=mixed,
        text_only=text_only,
        empty=tmp / "empty",
        not_index=tmp / "not-index",
        empty_file=tmp / "empty.jpg",
        bad=bad_annotations(tmp / "bad", val),
        damaged=damaged_indexes(tmp / "damaged", index),
        busy_port=listener.getsockname()[1],
    )


# ---------------------------------------------------------------------------------------------
# Part 1: bad command lines.


@dataclass
class Ran:
    rc: int | None  # None: killed (see `state`)
    out: str
    err: str
    state: str = "exited"  # or "served" (answered /healthz) or "hung" (past its timeout)
    seconds: float = 0.0


def run_ldot(args: list[str], timeout: float = 180, port: int | None = None) -> Ran:
    """Run `ldot ARGS`; with `port`, stop it as soon as it serves there."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([str(LDOT), *args], stdout=out, stderr=err, text=True, env=ENV)
        state = wait_or_serve(proc, timeout, port)
        out.seek(0)
        err.seek(0)
        rc = proc.returncode if state == "exited" else None
        return Ran(rc, out.read(), err.read(), state, time.monotonic() - t0)


def wait_or_serve(proc: subprocess.Popen, timeout: float, port: int | None) -> str:
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        served = port is not None and answers(port)
        if served or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            return "served" if served else "hung"
        time.sleep(0.3)
    return "exited"


def answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def is_json(out: str, _err: str) -> str | None:
    try:
        json.loads(out)
    except ValueError:
        first = out.strip().splitlines()[0] if out.strip() else "(empty)"
        return f"stdout is not JSON: {first}"
    return None


def json_or_nothing(out: str, err: str) -> str | None:
    return None if not out.strip() else is_json(out, err)


def names(*words: str) -> Callable[[str, str], str | None]:
    def check(out: str, err: str) -> str | None:
        missing = [w for w in words if w not in out + err]
        return f"does not name {', '.join(missing)}" if missing else None

    return check


@dataclass
class Case:
    command: str
    what: str
    args: list[str]
    expect: str = "error"  # "ok": it should succeed
    check: Callable[[str, str], str | None] | None = None  # (stdout, stderr) -> what is wrong
    port: int | None = None  # `ldot serve`: where it would serve


def extract_cases(f: Fixtures) -> list[Case]:
    out = str(f.tmp / "features")
    im = ["--images", str(f.few)]
    return [
        Case("extract", "--images that does not exist", ["--images", "/nonexistent", "--out", out]),
        Case("extract", "--images is a file", ["--images", str(f.annotations), "--out", out]),
        Case("extract", "--out is a file", [*im, "--out", str(f.annotations)]),
        Case("extract", "--backbone unknown", [*im, "--out", out + "1", "--backbone", "nope"]),
        Case("extract", "--batch-size 0", [*im, "--out", out + "2", "--batch-size", "0"]),
        Case("extract", "--detector without .npz files", [*im, "--out", out + "5", "--detector"]),
        Case(
            "extract",
            "a text file named .jpg among images (skipped, named)",
            ["--images", str(f.mixed), "--out", out + "6"],
            expect="ok",
            check=names("broken.jpg"),
        ),
    ]


def index_annotation_cases(f: Fixtures) -> list[Case]:
    def run(name: str, what: str, expect: str = "error", check=None) -> Case:
        args = ["--out", str(f.tmp / f"ix-{name}"), "--images", str(f.images)]
        args += ["--annotations", str(f.bad[name])]
        return Case("index", what, args, expect, check)

    return [
        run("empty", "--annotations an empty file"),
        run("invalid", "--annotations invalid JSON"),
        run("no-images", 'annotations without "images"'),
        run("filename-int", 'an entry with "filename": 123'),
        run("sentences-str", 'an entry with "sentences": "x"'),
        run("no-filename", 'an entry without "filename"'),
        run("no-split", 'an entry without "split"'),
        run("no-raw", 'a sentence without "raw"'),
        run("traversal", 'an entry with "filename": "../../etc/passwd"'),
        run("duplicate", "two entries of the same image"),
        run(
            "missing-file",
            "an entry naming a missing file (skipped, named)",
            "ok",
            names("no_such_image.jpg"),
        ),
    ]


def index_cases(f: Fixtures) -> list[Case]:
    ann = ["--annotations", str(f.annotations)]

    def out(name: str) -> list[str]:
        return ["--out", str(f.tmp / f"ix-{name}")]

    img = ["--images", str(f.images)]
    return [
        Case("index", "--images that does not exist", [*out("a"), "--images", "/nonexistent"]),
        Case("index", "--annotations missing", [*out("c"), *img, "--annotations", "/nope.json"]),
        Case("index", "--annotations is a folder", [*out("d"), *img, "--annotations", str(f.few)]),
        Case("index", "--split absent from the file", [*out("e"), *img, *ann, "--split", "test"]),
        Case(
            "index",
            "a text file named .jpg among images (skipped, named)",
            [*out("f"), "--images", str(f.mixed)],
            expect="ok",
            check=names("broken.jpg"),
        ),
        Case("index", "only a text file named .jpg", [*out("g"), "--images", str(f.text_only)]),
        Case("index", "an empty image folder", [*out("h"), "--images", str(f.empty)]),
        Case(
            "index",
            "--out a non-empty folder that is not an index",
            ["--out", str(f.not_index), "--images", str(f.few)],
        ),
        Case("index", "--out is a file", ["--out", str(f.annotations), "--images", str(f.few)]),
        Case(
            "index", "--factory unknown", [*out("i"), "--images", str(f.few), "--factory", "Bogus"]
        ),
        Case(
            "index",
            "--factory IVF64,Flat over 3 images",
            [*out("j"), "--images", str(f.few), "--factory", "IVF64,Flat"],
        ),
        Case("index", "--model unknown", [*out("k"), "--images", str(f.few), "--model", "nope"]),
        Case(
            "index",
            "--features that does not exist",
            [*out("l"), "--images", str(f.few), "--features", "/nonexistent"],
        ),
        Case(
            "index",
            "--add to a folder that does not exist",
            ["--out", str(f.tmp / "nowhere"), "--images", str(f.few), "--add"],
        ),
        Case(
            "index",
            "--add to a folder that is not an index",
            ["--out", str(f.not_index), "--images", str(f.few), "--add"],
        ),
    ]


def search_cases(f: Fixtures) -> list[Case]:
    ix = str(f.index)
    q = [ix, "a dog runs on the grass"]
    one = str(f.few / next(iter(sorted(os.listdir(f.few)))))
    cases = [
        Case("search", "--k 0", [*q, "--k", "0"]),
        Case("search", "--k 5 --rerank 2", [*q, "--k", "5", "--rerank", "2"]),
        Case("search", "--rerank -1", [*q, "--rerank", "-1"]),
        Case("search", "an empty query", [ix, ""]),
        Case("search", "no query", [ix]),
        Case("search", "an index folder that does not exist", ["/nonexistent", "a dog"]),
        Case("search", "a file as the index folder", [str(f.annotations), "a dog"]),
        Case("search", "a folder that is not an index", [str(f.not_index), "a dog"]),
        Case("search", "--image that does not exist", [ix, "--image", "/nonexistent.jpg"]),
        Case("search", "--image of a text file", [ix, "--image", str(f.text_only / "broken.jpg")]),
        Case("search", "--image of a folder", [ix, "--image", str(f.few)]),
        Case("search", "--image of an empty file", [ix, "--image", str(f.empty_file)]),
        Case("search", "--model unknown", [*q, "--model", "nope"]),
        Case("search", "--reranker unknown", [*q, "--k", "4", "--rerank", "4", "--reranker", "no"]),
        Case(
            "search",
            "--k 0 --json (stdout empty or JSON)",
            [*q, "--k", "0", "--json"],
            check=json_or_nothing,
        ),
        Case(
            "search",
            "--k 1000000000 (at most every image)",
            [*q, "--k", "1000000000", "--json"],
            expect="ok",
            check=is_json,
        ),
        Case(
            "search",
            "--json, one query (stdout parses)",
            [*q, "--json"],
            expect="ok",
            check=is_json,
        ),
        Case(
            "search",
            "--json, two queries (stdout parses)",
            [*q, "a child", "--json"],
            expect="ok",
            check=is_json,
        ),
        Case(
            "search",
            "--image --json (stdout parses)",
            [ix, "--image", one, "--json"],
            expect="ok",
            check=is_json,
        ),
    ]
    for name, folder in f.damaged.items():
        cases.append(Case("search", f"damaged index: {name}", [str(folder), "a dog"]))
    return cases


def evaluate_cases(f: Fixtures) -> list[Case]:
    base = ["--annotations", str(f.annotations), "--images", str(f.images), "--split", "val"]
    return [
        Case("evaluate", "--split absent from the file", [*base[:4], "--split", "test"]),
        Case("evaluate", "--model unknown", [*base, "--model", "nope"]),
        Case("evaluate", "--rerank -1", [*base, "--rerank", "-1"]),
        Case("evaluate", "--json into a folder", [*base, "--json", str(f.empty)]),
    ]


def serve_cases(f: Fixtures) -> list[Case]:
    ix = str(f.index)

    def serve(what: str, args: list[str]) -> Case:
        port = free_port()
        args = [*args, "--port", str(port)] if "--port" not in args else args
        return Case("serve", what, args, port=port)

    return [
        serve("a folder that does not exist", ["/nonexistent"]),
        serve("a file", [str(f.annotations)]),
        serve("a damaged index (retriever.json)", [str(f.damaged["record-garbage"])]),
        serve("a damaged index (truncated index.faiss)", [str(f.damaged["faiss-truncated"])]),
        serve("--max-upload-mb 0", [ix, "--max-upload-mb", "0"]),
        serve("--max-batch 0", [ix, "--max-batch", "0"]),
        serve("--threads -1", [ix, "--threads", "-1"]),
        # Were 70000 taken modulo 65536, it would serve on the free port this leads to.
        Case(
            "serve",
            "--port 65536 + a free port",
            [ix, "--port", str(65536 + (p := free_port()))],
            port=p,
        ),
        serve("--port already in use", [ix, "--port", str(f.busy_port)]),
        serve("--reranker unknown", [ix, "--reranker", "nope"]),
    ]


def cli_cases(f: Fixtures) -> list[Case]:
    return (
        extract_cases(f)
        + index_annotation_cases(f)
        + index_cases(f)
        + search_cases(f)
        + evaluate_cases(f)
        + serve_cases(f)
    )


def judge(case: Case, ran: Ran) -> str:
    text = ran.out + ran.err
    if "Traceback" in text:
        verdict = "traceback"
    elif ran.state != "exited":
        verdict = "accepted (served)" if ran.state == "served" else "hung"
    elif ran.rc == 0:
        verdict = "ok" if case.expect == "ok" else "accepted"
    elif re.search(r"^error: ", ran.err, re.M):
        verdict = "clear error"
    elif "Usage:" in ran.err and "Error" in ran.err:
        verdict = "usage error"
    elif re.search(r"error", ran.err, re.I):
        verdict = "other error message"
    else:
        verdict = "unclear failure"
    problem = case.check(ran.out, ran.err) if case.check and verdict != "traceback" else None
    return f"wrong: {problem}" if problem else verdict


def as_expected(case: Case, verdict: str) -> bool:
    wanted = ("ok",) if case.expect == "ok" else ("clear error", "usage error")
    return verdict in wanted


def message(ran: Ran) -> str:
    """The line a user reads: the error, typer's complaint, the exception, or the last line."""
    lines = [s.strip(" │╭╰─") for s in ran.err.splitlines() if s.strip(" │╭╰─")]
    for pattern in (r"^error: ", r"Invalid value|No such|Missing|Got unexpected", r"^ERROR:"):
        hit = next((s for s in lines if re.search(pattern, s)), None)
        if hit:
            return hit
    if "Traceback" in ran.err:
        return next((s for s in reversed(lines) if not s.startswith("File ")), "")
    if ran.rc == 0 and is_json(ran.out, "") is None:
        return json_summary(json.loads(ran.out))
    return lines[-1] if lines else ran.out.strip().splitlines()[-1] if ran.out.strip() else ""


def json_summary(answer: dict | list) -> str:
    """`ldot search --json` output in words: how many results each query got."""
    answers = answer if isinstance(answer, list) else [answer]
    counts = ", ".join(str(len(a.get("results", []))) for a in answers)
    return f"stdout is JSON: {len(answers)} answer(s), {counts} result(s)"


def run_case(case: Case, timeout: float) -> Ran:
    return run_ldot([case.command, *case.args], timeout, case.port)


def part_cli(f: Fixtures, places: Places, jobs: int, timeout: float) -> dict:
    cases = cli_cases(f)
    with ThreadPoolExecutor(jobs) as pool:  # each case is its own process
        runs = list(pool.map(lambda c: run_case(c, timeout), cases))
    rows, verdicts, failed = [], Counter(), []
    for case, ran in zip(cases, runs, strict=True):
        verdict = judge(case, ran)
        verdicts[verdict.split(":")[0]] += 1
        ok = as_expected(case, verdict)
        cmd = places.hide(" ".join(["ldot", case.command, *map(shell_word, case.args)]), 400)
        if not ok:
            failed.append((cmd, verdict, places.hide(message(ran), 300)))
        shown = places.hide(message(ran))
        rows.append([case.command, places.hide(case.what), case.expect, verdict, yes(ok), shown])
        print(f"cli: {case.command} {case.what}: {verdict} ({ran.seconds:.0f} s)", flush=True)
    return {"rows": rows, "verdicts": verdicts, "failed": failed, "count": len(cases)}


def shell_word(s: str) -> str:
    return s if s and re.fullmatch(r"[\w@%+=:,./-]+", s) else "'" + s.replace("'", "'\\''") + "'"


def yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


# ---------------------------------------------------------------------------------------------
# Part 2: bad HTTP requests.


def png(size: tuple[int, int] = (16, 16), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


def multipart(field_name: str, filename: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body of one file, and its content type."""
    b = "reliability-boundary"
    head = (
        f'--{b}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


@dataclass
class Req:
    what: str
    expect: str  # a status, "4xx", or "not 5xx"; alternatives joined by "|"
    method: str = "GET"
    path: str = "/"
    params: dict | None = None
    files: list | None = None
    data: dict | None = None
    headers: dict = field(default_factory=dict)
    content: bytes | None = None
    chunked: bool = False  # send `content` without a Content-Length
    raw: bytes | None = None  # the request exactly, for what httpx would tidy (dot segments)


def raw_get(path: str, port: int) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()


def huge_declared(path: str, port: int) -> bytes:
    """A POST that declares a terabyte of body and sends a few bytes of it."""
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
    head += "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 1000000000000\r\n"
    return (head + "\r\n--x\r\n").encode()


def search_requests(port: int) -> list[Req]:
    s = "/search"
    return [
        Req("q=a dog (control)", "200", path=s, params={"q": "a dog"}),
        Req("no q", "422", path=s),
        Req("q empty", "422", path=s, params={"q": ""}),
        Req("q of spaces", "400", path=s, params={"q": "   "}),
        Req("q of 1,001 characters", "422", path=s, params={"q": "a" * 1001}),
        Req("q of 100,000 characters (URL)", "4xx", raw=raw_get(f"{s}?q={'a' * 100_000}", port)),
        Req("q with a NUL byte", "not 5xx", path=s, params={"q": "a\x00dog"}),
        Req("q of invalid UTF-8 (%ff%fe)", "not 5xx", raw=raw_get(f"{s}?q=%ff%fe", port)),
        Req("q with a bad percent escape (%zz)", "not 5xx", raw=raw_get(f"{s}?q=%zz", port)),
        Req("k=0", "422", path=s, params={"q": "dog", "k": "0"}),
        Req("k=-1", "422", path=s, params={"q": "dog", "k": "-1"}),
        Req("k=10^9", "422", path=s, params={"q": "dog", "k": str(10**9)}),
        Req("k=10^30", "422", path=s, params={"q": "dog", "k": str(10**30)}),
        Req("k=abc", "422", path=s, params={"q": "dog", "k": "abc"}),
        Req("k=1.5", "422", path=s, params={"q": "dog", "k": "1.5"}),
        Req("rerank=-1", "422", path=s, params={"q": "dog", "rerank": "-1"}),
        Req("rerank=65 (over max_rerank)", "422", path=s, params={"q": "dog", "rerank": "65"}),
        Req("rerank=10^9", "422", path=s, params={"q": "dog", "rerank": str(10**9)}),
        Req("rerank=2, k=5", "400", path=s, params={"q": "dog", "rerank": "2", "k": "5"}),
        Req("rerank=x", "422", path=s, params={"q": "dog", "rerank": "x"}),
    ]


def image_search_requests(port: int) -> list[Req]:
    s, good = "/search/image", png()
    body, ctype = multipart("file", "big.png", b"\0" * (11 * 2**20))
    bomb = png((12_000, 12_000), "1")  # small on disk, 144 M pixels decoded
    return [
        Req("no file", "422", "POST", s),
        Req("an empty file", "400", "POST", s, files=[("file", ("e.png", b"", "image/png"))]),
        Req("a text file", "400", "POST", s, files=[("file", ("t.jpg", b"text", "image/jpeg"))]),
        Req(
            "a truncated PNG",
            "400",
            "POST",
            s,
            files=[("file", ("t.png", png((64, 64))[:60], "image/png"))],
        ),
        Req(
            "a 12,000 x 12,000 PNG (decompression bomb)",
            "400",
            "POST",
            s,
            files=[("file", ("bomb.png", bomb, "image/png"))],
        ),
        Req(
            "a 1 x 1 PNG",
            "not 5xx",
            "POST",
            s,
            files=[("file", ("one.png", png((1, 1)), "image/png"))],
        ),
        Req(
            "the file under another field name",
            "422",
            "POST",
            s,
            files=[("image", ("a.png", good, "image/png"))],
        ),
        Req(
            "a JSON body",
            "422",
            "POST",
            s,
            content=b'{"file": "a.png"}',
            headers={"Content-Type": "application/json"},
        ),
        Req(
            "multipart without a boundary",
            "4xx",
            "POST",
            s,
            content=b"--x\r\n\r\n",
            headers={"Content-Type": "multipart/form-data"},
        ),
        Req(
            "k=0 in the form",
            "422",
            "POST",
            s,
            files=[("file", ("a.png", good, "image/png"))],
            data={"k": "0"},
        ),
        Req(
            "rerank=5 with k=10",
            "400",
            "POST",
            s,
            files=[("file", ("a.png", good, "image/png"))],
            data={"rerank": "5"},
        ),
        Req("Content-Length: 10^12 declared", "413", raw=huge_declared(s, port)),
        Req(
            "11 MB sent chunked, no Content-Length",
            "413",
            "POST",
            s,
            content=body,
            headers={"Content-Type": ctype},
            chunked=True,
        ),
    ]


def add_requests(port: int) -> list[Req]:
    s, good = "/images", png()
    ok_file = [("files", ("a.png", good, "image/png"))]
    many = [("files", (f"{i}.png", png((8, 8 + i)), "image/png")) for i in range(33)]
    host = f"127.0.0.1:{port}"
    return [
        Req("no files", "422", "POST", s),
        Req("an empty file", "400", "POST", s, files=[("files", ("e.png", b"", "image/png"))]),
        Req("a text file", "400", "POST", s, files=[("files", ("t.jpg", b"text", "image/jpeg"))]),
        Req(
            "a truncated PNG",
            "400",
            "POST",
            s,
            files=[("files", ("t.png", png((64, 64))[:60], "image/png"))],
        ),
        Req(
            "one good image and one text file",
            "400",
            "POST",
            s,
            files=[*ok_file, ("files", ("t.jpg", b"text", "image/jpeg"))],
        ),
        Req("33 files (over max_files)", "4xx", "POST", s, files=many),
        Req("Content-Length: 10^12 declared", "413", raw=huge_declared(s, port)),
        Req(
            "Origin: http://evil.example",
            "403",
            "POST",
            s,
            files=ok_file,
            headers={"Origin": "http://evil.example"},
        ),
        Req(
            "Sec-Fetch-Site: cross-site",
            "403",
            "POST",
            s,
            files=ok_file,
            headers={"Sec-Fetch-Site": "cross-site"},
        ),
        Req("Origin: null", "403", "POST", s, files=ok_file, headers={"Origin": "null"}),
        Req(
            "Host and Origin evil.example (DNS rebinding)",
            "403",
            "POST",
            s,
            files=ok_file,
            headers={"Origin": "http://evil.example", "Host": "evil.example"},
        ),
        Req(
            "same Origin, a text file",
            "400",
            "POST",
            s,
            files=[("files", ("t.jpg", b"text", "image/jpeg"))],
            headers={"Origin": f"http://{host}"},
        ),
    ]


def read_requests(port: int, image_id: str) -> list[Req]:
    i = f"/images/{quote(image_id)}"
    return [
        Req("an indexed image, size=64 (control)", "200", path=i, params={"size": "64"}),
        Req("an id not in the index", "404", path="/images/nope.jpg"),
        Req("../../etc/passwd", "404", raw=raw_get("/images/../../etc/passwd", port)),
        Req(
            "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
            "404",
            raw=raw_get("/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd", port),
        ),
        Req("..%2F..%2Fetc%2Fpasswd", "404", raw=raw_get("/images/..%2F..%2Fetc%2Fpasswd", port)),
        Req("//etc/passwd (absolute)", "404", raw=raw_get("/images//etc/passwd", port)),
        Req("an id with a NUL byte (%00)", "404", raw=raw_get("/images/a%00.jpg", port)),
        Req("size=-1", "422", path=i, params={"size": "-1"}),
        Req("size=100000", "422", path=i, params={"size": "100000"}),
        Req("size=abc", "422", path=i, params={"size": "abc"}),
        Req("an unknown route", "404", path="/nope"),
        Req("a method the route lacks", "405", "DELETE", "/search"),
        Req("a method the route lacks", "405", "PUT", "/images", content=b"x"),
        Req("no id", "404|405", path="/images"),
        Req("a method the route lacks", "405", "POST", "/healthz"),
        Req("(control)", "200", path="/healthz"),
    ]


def send(client: httpx.Client, port: int, req: Req) -> tuple[int, str]:
    """(status, body as text); status 0 when no answer came."""
    if req.raw is not None:
        return raw_http(port, req.raw)
    content = iter([req.content]) if req.chunked else req.content
    try:
        r = client.request(
            req.method,
            req.path,
            params=req.params,
            files=req.files,
            data=req.data,
            headers=req.headers,
            content=content,
        )
    except httpx.HTTPError as e:
        return 0, f"{type(e).__name__}: {e}"
    return r.status_code, r.content.decode("utf-8", "replace")


def raw_http(port: int, request: bytes, timeout: float = 30) -> tuple[int, str]:
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    if b"transfer-encoding: chunked" in head.lower():
        body = dechunk(body)
    return status, body.decode("utf-8", "replace")


def dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        n = int(size.split(b";")[0] or b"0", 16)
        if n == 0:
            break
        out, body = out + rest[:n], rest[n + 2 :]
    return out


def meets(expect: str, status: int) -> bool:
    for want in expect.split("|"):
        if want == "not 5xx" and 0 < status < 500:
            return True
        if want == "4xx" and 400 <= status < 500:
            return True
        if want.isdigit() and int(want) == status:
            return True
    return False


def body_kind(status: int, body: str) -> str:
    """How a 4xx body reads: a JSON detail string, FastAPI's list of field errors, or else."""
    if not 400 <= status < 500:
        return ""
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        return "not JSON"
    if isinstance(detail, str):
        return "detail string"
    if isinstance(detail, list):
        return "detail list"
    return "JSON without detail"


def detail_of(body: str) -> str:
    try:
        detail = json.loads(body)["detail"]
    except (ValueError, KeyError, TypeError):
        return body[:80] if body.isprintable() else f"({len(body)} bytes)"
    if isinstance(detail, list):  # FastAPI's field errors: where, and what
        return "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
    return str(detail)


def health(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).json()


def server_log(proc: subprocess.Popen) -> str:
    """What a server from `start_server` has written so far. It writes into an unnamed temporary
    file; the process's own descriptor still reaches it (Linux)."""
    try:
        return Path(f"/proc/{proc.pid}/fd/1").read_text(errors="replace")
    except OSError:
        return ""


def part_http(port: int, image_id: str, places: Places) -> dict:
    reqs = search_requests(port) + image_search_requests(port) + add_requests(port)
    reqs += read_requests(port, image_id)
    before = health(port)["images"]
    rows, classes, kinds, failed, leaks = [], Counter(), Counter(), [], []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        for req in reqs:
            status, body = send(client, port, req)
            classes[f"{status // 100}xx" if status else "no answer"] += 1
            kind = body_kind(status, body)
            if kind:
                kinds[kind] += 1
            leaked = places.leaked(body)
            ok = meets(req.expect, status) and not leaked
            if leaked:
                leaks.append((req.what, leaked))
            if not ok:
                failed.append((describe(req), status, places.hide(detail_of(body), 300)))
            note = f"leaks {', '.join(leaked)}; " if leaked else ""
            shown = places.hide(note + (kind + ": " if kind else "") + detail_of(body), 100)
            rows.append([places.hide(describe(req), 70), req.expect, str(status), yes(ok), shown])
            print(f"http: {req.what}: {status}", flush=True)
    after = health(port)["images"]
    return {
        "rows": rows,
        "classes": classes,
        "kinds": kinds,
        "failed": failed,
        "leaks": leaks,
        "count": len(reqs),
        "added": after - before,
    }


def describe(req: Req) -> str:
    if req.raw is not None:
        return f"{req.raw.split(b' ')[0].decode()} {req.raw.split(b' ')[1].decode()}: {req.what}"
    return f"{req.method} {req.path}: {req.what}"


# ---------------------------------------------------------------------------------------------
# Part 3: the OpenAPI fuzzer.

# Greedy to the line's last brace: a route template such as /images/{image_id:path} has its own.
SERIES = re.compile(r"^ldot_requests_total\{(?P<labels>.*)\} (?P<value>\S+)$", re.M)


def requests_by_label(port: int) -> Counter:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    counts = Counter()
    for m in SERIES.finditer(text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels")))
        counts[(labels["route"], labels["method"], labels["status"])] += float(m.group("value"))
    return counts


def fuzz_command(port: int, args: argparse.Namespace, report_dir: Path) -> list[str]:
    return [
        str(FUZZ),
        "run",
        f"http://127.0.0.1:{port}/openapi.json",
        "--max-examples",
        str(args.fuzz_examples),
        "--max-time",
        str(args.fuzz_seconds),
        "--workers",
        "1",
        "--checks",
        args.fuzz_checks,
        "--seed",
        "0",
        "--report",
        "junit",
        "--report-dir",
        str(report_dir),
    ]


def junit_failures(report_dir: Path) -> list[str]:
    """Each failing test case of the fuzzer's JUnit report: its operation and first line."""
    found = []
    for xml in report_dir.glob("*.xml"):
        for case in ET.parse(xml).getroot().iter("testcase"):
            for bad in [*case.iter("failure"), *case.iter("error")]:
                text = (bad.get("message") or bad.text or "").strip().splitlines()
                found.append(f"{case.get('name')}: {text[0] if text else bad.tag}")
    return found


def no_summary(run: subprocess.CompletedProcess, places: Places) -> str:
    """What schemathesis said when it did not get as far as its summary."""
    said = (run.stdout + run.stderr).strip().splitlines()
    return f"none (it said: {places.hide(said[-1] if said else 'nothing', 200)})"


def part_fuzz(port: int, args: argparse.Namespace, tmp: Path, places: Places) -> dict | None:
    if not FUZZ.exists():
        return None
    before = requests_by_label(port)
    cmd = fuzz_command(port, args, tmp / "fuzz-report")
    t0 = time.monotonic()
    # In the temporary folder: schemathesis and hypothesis keep caches in the working folder.
    limit = args.fuzz_seconds + 600
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=tmp)
    seconds = time.monotonic() - t0
    after = requests_by_label(port)
    after[("/metrics", "GET", "200")] -= 1  # the scrape before the run
    diff = {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0) > 0}
    summary = re.search(r"Test cases:\s*\n\s*(.+)", run.stdout)
    failures = [places.hide(f, 200) for f in junit_failures(tmp / "fuzz-report")]
    return {
        "diff": diff,
        "rc": run.returncode,
        "seconds": seconds,
        "failures": failures,
        "summary": summary.group(1).strip() if summary else no_summary(run, places),
    }


# ---------------------------------------------------------------------------------------------
# Part 4: crash points, with the tests' tiny model.


def tiny_corpus(root: Path) -> Path:
    """The tests' corpus (tests/conftest.py): 8 train + 4 val images of plain colours, two
    captions each, in Karpathy format."""
    from tests.helpers import COLOURS

    images = root / "images"
    images.mkdir(parents=True)
    entries = []
    for i, colour in enumerate(COLOURS + COLOURS[:4]):
        name = f"img{i:02d}.png"
        Image.new("RGB", (32, 24), colour).save(images / name)
        caps = [f"a {colour} picture", f"something {colour}"]
        sentences = [{"raw": c, "tokens": c.split()} for c in caps]
        entries.append(
            {"filename": name, "split": "train" if i < 8 else "val", "sentences": sentences}
        )
    write_annotations(root / "captions.json", entries)
    return root


def tiny_model(out: Path) -> Path:
    import torch
    from tests.helpers import tiny_model_config

    from lightningdot.model.checkpoint import save_model
    from lightningdot.model.encoders import BiEncoder

    torch.manual_seed(0)
    m = BiEncoder(tiny_model_config())
    m.init_pretrained()
    save_model(out, m.eval())
    return out


def crash_ops(root: Path) -> list[tuple[str, str, Path | None, dict, tuple[str, ...]]]:
    """(what, op, folder before, op's arguments, faults) of each write the tests fail: killed
    at a step, and, for the writes a served index takes, that step failing as a full disk."""
    from tests.helpers import as_older_layout, index_of_saved_model

    from lightningdot.data import Corpus, read_karpathy

    corpus_dir, model_dir = tiny_corpus(root / "corpus"), tiny_model(root / "model")
    corpus = read_karpathy(corpus_dir / "captions.json")
    index = root / "index"
    index_of_saved_model(model_dir, Corpus(corpus.images[:4]), corpus_dir, index)
    from tests.helpers import more_photos

    folder, annotations = more_photos(root)
    add = {"images": str(folder), "annotations": str(annotations)}
    older = as_older_layout(index, root / "older", {"upload-1234.png": png((12, 12))})
    build = {"images": str(corpus_dir / "images"), "annotations": str(corpus_dir / "captions.json")}
    uploads = {"files": [str(folder / n) for n in ("a.png", "b.png")]}
    both = ("kill", "enospc")
    return [
        ("add from another folder, with captions", "add", index, add, both),
        ("upload (two images)", "upload", index, uploads, both),
        ("build a new index", "build", None, {**build, "model": str(model_dir)}, ("kill",)),
        ("first add to a folder of the older layout", "add", older, add, ("kill",)),
    ]


def part_crash(tmp: Path) -> list[dict]:
    from tests.index.crash import crash_every_step

    found = []
    for n, (what, op, before, args, faults) in enumerate(crash_ops(tmp / "crash")):
        for fault in faults:
            try:
                result = crash_every_step(tmp / f"crash-{n}", op, before, fault, **args)
            except (RuntimeError, SystemExit, subprocess.TimeoutExpired) as e:
                result = {"error": str(e)}
            found.append({"what": what, "fault": FAULTS[fault], **result})
            print(f"crash: {what}, {fault}: {result}", flush=True)
    return found


FAULTS = {"kill": "killed", "enospc": "disk full"}


# ---------------------------------------------------------------------------------------------
# Part 5: searches while images are added, then a kill.


@dataclass
class Live:
    """What the clients of part 5 saw."""

    answered: int = 0
    failed: Counter = field(default_factory=Counter)
    uploads: list[tuple[int, str, bool]] = field(default_factory=list)  # (status, id, added)


def keep_searching(url: str, queries: list[str], stop: threading.Event, live: Live) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        i = 0
        while not stop.is_set():
            try:
                r = client.get("/search", params={"q": queries[i % len(queries)], "k": "10"})
                ok = r.status_code == 200 and len(r.json()["results"]) == 10
                live.answered += ok
                if not ok:
                    live.failed[f"status {r.status_code}"] += 1
            except (httpx.HTTPError, ValueError) as e:
                live.failed[type(e).__name__] += 1
            i += 1


def keep_uploading(url: str, photos: list[Path], spread: float, live: Live) -> None:
    """POST the photos one at a time, `spread` seconds apart, as a page on this server would."""
    with httpx.Client(base_url=url, timeout=120) as client:
        for path in photos:
            files = [("files", (f"mirrored-{path.name}", mirrored_jpeg(path), "image/jpeg"))]
            try:
                r = client.post("/images", files=files)
                image = r.json()["images"][0] if r.status_code == 200 else {}
                live.uploads.append((r.status_code, image.get("id", ""), image.get("added", False)))
            except (httpx.HTTPError, ValueError) as e:
                live.uploads.append((0, type(e).__name__, False))
            time.sleep(spread)


def reachable(port: int, ids: list[str]) -> list[str]:
    """The ids whose thumbnail does not come back."""
    missing = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        for i in ids:
            r = client.get(f"/images/{quote(i)}", params={"size": "64"})
            if r.status_code != 200 or r.headers.get("content-type") != "image/jpeg":
                missing.append(f"{i} ({r.status_code})")
    return missing


def live_fixtures(tmp: Path, data: Path, features: Path | None, args) -> dict:
    entries = karpathy(data)
    val = [e for e in entries if e["split"] == "val"]
    train = [e for e in entries if e["split"] == "train"]
    gallery, uploads = val[: args.live_images], val[args.live_images :][: args.live_uploads]
    index = tmp / "live"
    build_with_ldot(index, data / "images", write_annotations(tmp / "live.json", gallery), features)
    other = link_images(
        tmp / "other", data / "images", [e["filename"] for e in train[: args.live_adds]]
    )
    queries = [s["raw"] for e in val for s in e["sentences"]]
    photos = [data / "images" / e["filename"] for e in uploads]
    return {"index": index, "other": other, "queries": queries, "photos": photos}


def part_concurrent(tmp: Path, data: Path, features: Path | None, args, places: Places) -> dict:
    fx = live_fixtures(tmp, data, features, args)
    port = free_port()
    server = start_server(fx["index"], port, 0)
    try:
        initial = health(port)["images"]
        live, adder, seconds = add_while_searching(fx, port, args)
        before_kill = health(port)["images"]
        log = server_log(server)
    finally:
        os.kill(server.pid, signal.SIGKILL)  # no shutdown: what a crash or an OOM kill does
        server.wait()
    added_ids = [f"{fx['other'].name}/{p.name}" for p in sorted(fx["other"].iterdir())]
    uploaded = [i for status, i, added in live.uploads if status == 200 and added]
    after = restart_and_check(fx["index"], added_ids + uploaded)
    return {
        "seconds": seconds,
        "answered": live.answered,
        "failed": live.failed,
        "initial": initial,
        "other": len(added_ids),
        "uploaded": len(uploaded),
        "upload_statuses": Counter(s for s, _, _ in live.uploads),
        "adder_rc": adder.rc,
        "adder_says": places.hide(message(adder)),
        "before_kill": before_kill,
        **after,
        "tracebacks": log.count("Traceback") + after["tracebacks"],
    }


def add_while_searching(fx: dict, port: int, args) -> tuple[Live, Ran, float]:
    """Searches without pause while `ldot index --add` runs and uploads come one by one, for
    at least `args.live_seconds` and until both adds are done."""
    url, live, stop = f"http://127.0.0.1:{port}", Live(), threading.Event()
    spread = args.live_seconds / max(len(fx["photos"]), 1)
    searcher = threading.Thread(target=keep_searching, args=(url, fx["queries"], stop, live))
    uploader = threading.Thread(target=keep_uploading, args=(url, fx["photos"], spread, live))
    t0 = time.monotonic()
    searcher.start()
    uploader.start()
    adder = run_ldot(["index", "--images", str(fx["other"]), "--out", str(fx["index"]), "--add"])
    uploader.join()
    time.sleep(max(0.0, args.live_seconds - (time.monotonic() - t0)))
    stop.set()
    searcher.join()
    return live, adder, time.monotonic() - t0


def restart_and_check(index: Path, ids: list[str]) -> dict:
    port = free_port()
    server = start_server(index, port, 0)
    try:
        found = health(port)["images"]
        missing = reachable(port, ids)
        search_after = answers_search(port)
        tracebacks = server_log(server).count("Traceback")
    finally:
        server.terminate()
        server.wait(30)
    return {
        "found": found,
        "missing": missing,
        "search_after": search_after,
        "tracebacks": tracebacks,
    }


def answers_search(port: int) -> bool:
    r = httpx.get(f"http://127.0.0.1:{port}/search", params={"q": "a dog"}, timeout=60)
    return r.status_code == 200 and bool(r.json()["results"])


# ---------------------------------------------------------------------------------------------
# The report.


def counted(c: Counter) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(c.items(), key=lambda kv: -kv[1])) or "none"


def cli_text(r: dict | None) -> list[str]:
    if r is None:
        return ["### Bad inputs, CLI", "", "Not run (`--parts`)."]
    bad = [f"- `{cmd}`: {verdict} ({msg})" for cmd, verdict, msg in r["failed"]]
    return [
        "### Bad inputs, CLI",
        "",
        f"{r['count']} invocations of `ldot`, each a process of the installed entry point. "
        '"clear error": non-zero exit, an `error:` line, no traceback; "usage error": typer\'s '
        'own message for an option out of range, no traceback; "accepted": exit 0 where it '
        'should fail; "ok"/"wrong": of the few that should succeed. $TMP is the fixtures\' '
        "temporary folder, $DATA the Flickr8k folder.",
        "",
        f"Outcomes: {counted(r['verdicts'])}. Not as expected: {len(r['failed'])}.",
        *(["", *bad] if bad else []),
        "",
        table(["command", "bad input", "expected", "outcome", "as expected", "message"], r["rows"]),
    ]


def http_text(r: dict | None) -> list[str]:
    if r is None:
        return ["### Bad inputs, HTTP", "", "Not run (`--parts`)."]
    bad = [f"- `{req}`: {status} ({detail})" for req, status, detail in r["failed"]]
    leaks = [f"- {what}: leaks a path ({', '.join(where)})" for what, where in r["leaks"]]
    return [
        "### Bad inputs, HTTP",
        "",
        f"{r['count']} requests to `ldot serve` on 127.0.0.1 (the 30-image index; the web page's "
        "own host). Status classes: "
        f'{counted(r["classes"])}. 4xx bodies: {counted(r["kinds"])} (a "detail list" is '
        "FastAPI's list of field errors, each with where and what). Bodies that name an "
        f"absolute folder of the server ($TMP, $DATA, $REPO): {len(r['leaks'])}. Images added "
        f"by these requests: {r['added']}. Tracebacks in the server's log (these requests and "
        f"the fuzzer's): {r['tracebacks']}. Not as expected: {len(r['failed'])}.",
        *(["", *bad, *leaks] if bad or leaks else []),
        "",
        table(["request", "expected", "status", "as expected", "body"], r["rows"]),
    ]


def fuzz_text(r: dict | None, args: argparse.Namespace, ran: bool) -> list[str]:
    head = ["### OpenAPI fuzzer (schemathesis)", ""]
    if not ran:
        return [*head, "Not run (`--parts`)."]
    if r is None:
        return [
            *head,
            "Skipped: schemathesis is not installed. Install it apart from the "
            "project: `python -m venv .cache/fuzz && .cache/fuzz/bin/pip install schemathesis`.",
        ]
    total = sum(r["diff"].values())
    server_errors = {k: v for k, v in r["diff"].items() if k[2].startswith("5")}
    rows = [
        [route, method, status, f"{n:g}"]
        for (route, method, status), n in sorted(r["diff"].items())
    ]
    failures = [f"- {f}" for f in r["failures"][:20]]
    return [
        *head,
        f"`st run` over /openapi.json, `--max-examples {args.fuzz_examples} --max-time "
        f"{args.fuzz_seconds:g} --workers 1 --seed 0 --checks {args.fuzz_checks}`, against the "
        f"same server after the requests above; it ran {r['seconds']:.0f} s and exited "
        f"{r['rc']}. Its own count of test cases: {r['summary']}. From the server's /metrics: "
        f"{total:g} requests, {sum(server_errors.values()):g} answered 5xx.",
        "",
        f"Failing checks reported by schemathesis: {len(r['failures'])}"
        + (":" if failures else "."),
        *failures,
        "",
        table(["route", "method", "status", "requests"], rows),
    ]


def crash_text(r: list | None) -> list[str]:
    head = ["### Crash points", ""]
    if r is None:
        return [*head, "Not run (`--parts`)."]
    rows = [crash_row(f) for f in r]
    return [
        *head,
        "Each write to an index folder, failed at each of its file operations in turn (opening "
        "for writing, each write, fsync, rename, unlink, mkdir, FAISS writing an index file), "
        "on a fresh copy each time, by `tests/index/crash.py` with the tests' tiny model. "
        '"killed": SIGKILL at that step (a write there leaves half its bytes); "disk full": '
        "that step raises ENOSPC and the writer's own error handling runs. Then every copy is "
        'opened: its state is "old" or "new" (as before or after the write; before a build: no '
        'index) or "broken"; "orphans": files the opening left that neither state has; '
        '"unfinished": running the write again did not reach the new state.',
        "",
        table(["write", "fault", "steps", "old", "new", "broken", "orphans", "unfinished"], rows),
    ]


def crash_row(f: dict) -> list[str]:
    if "error" in f:  # the harness itself stopped: a write failed without being made to
        return [f["what"], f["fault"], "-", "-", "-", f"**failed**: {f['error'][:120]}", "-", "-"]
    steps = len(f["old"]) + len(f["new"]) + len(f["broken"])
    counts = [str(steps), str(len(f["old"])), str(len(f["new"]))]
    return [
        f["what"],
        f["fault"],
        *counts,
        *(listed(f[k]) for k in ("broken", "orphans", "unfinished")),
    ]


def listed(steps: list[int]) -> str:
    return f"{len(steps)} (steps {', '.join(map(str, steps))})" if steps else "0"


def concurrent_text(r: dict | None, args: argparse.Namespace) -> list[str]:
    head = ["### Searches during concurrent adds, then a kill", ""]
    if r is None:
        return [*head, "Not run (`--parts`)."]
    expected = r["initial"] + r["other"] + r["uploaded"]
    missing = ", ".join(r["missing"][:10]) or "none"
    rows = [
        ["searches answered (10 results each)", str(r["answered"])],
        ["searches failed", f"{sum(r['failed'].values())} ({counted(r['failed'])})"],
        ["`ldot index --add` exit code", f"{r['adder_rc']} ({r['adder_says']})"],
        ["POST /images answers", counted(r["upload_statuses"])],
        ["images before the adds", str(r["initial"])],
        [
            "expected after (initial + folder + uploads)",
            f"{expected} = {r['initial']} + {r['other']} + {r['uploaded']}",
        ],
        ["served before the kill (/healthz)", str(r["before_kill"])],
        ["found after SIGKILL and restart (/healthz)", str(r["found"])],
        ["added ids not reachable at /images/{id}?size=64", f"{len(r['missing'])} ({missing})"],
        ["a search after the restart answers", "yes" if r["search_after"] else "**no**"],
        ["tracebacks in the server's log", str(r["tracebacks"])],
    ]
    return [
        *head,
        f"`ldot serve` on a {r['initial']}-image index of Flickr8k val; for {r['seconds']:.0f} s "
        "one client sends text searches without pause (real val captions, k = 10) while "
        f"`ldot index --images other --out INDEX --add` adds {r['other']} Flickr8k train images "
        f"from another folder (another process) and a second client POSTs {args.live_uploads} "
        "mirrored val photos to /images one at a time. Then the server is killed with SIGKILL, "
        "started again, and every added id is fetched as a 64-pixel thumbnail.",
        "",
        table(["measure", "value"], rows),
    ]


def compose(results: dict, args: argparse.Namespace, seconds: float) -> str:
    flags = " ".join(a for a in sys.argv[1:] if a != "--no-write")
    command = f"python benchmarks/reliability.py{' ' + flags if flags else ''}"
    per_part = ", ".join(f"{k} {v:.0f}" for k, v in results["times"].items())
    return "\n".join(
        [
            "## Reliability: bad input, a fuzzer, crashes, adds while serving",
            "",
            f"Machine: {machine()}; commit {commit()}. The whole run took {seconds / 60:.1f} min "
            f"(fixtures: {args.cli_images} and {args.live_images} Flickr8k val images, the "
            f"shipped model; the tests' tiny model for crash points); seconds per part: "
            f"{per_part}. Reproduce: `{command}`.",
            "",
            *cli_text(results.get("cli")),
            "",
            *http_text(results.get("http")),
            "",
            *fuzz_text(results.get("fuzz"), args, "fuzz" in args.parts),
            "",
            *crash_text(results.get("crash")),
            "",
            *concurrent_text(results.get("concurrent"), args),
        ]
    )


def run_parts(args: argparse.Namespace, tmp: Path) -> dict:
    places = places_of(tmp, args.data)
    features = args.features if args.features.is_dir() else None
    results, times = {}, {}
    if {"cli", "http", "fuzz"} & set(args.parts):
        with socket.socket() as listener:  # the port `ldot serve` finds taken
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            fx = make_fixtures(tmp, args.data, args.cli_images, listener)
            if "cli" in args.parts:
                t0 = time.monotonic()
                results["cli"] = part_cli(fx, places, args.jobs, args.cli_timeout)
                times["cli"] = time.monotonic() - t0
        results.update(serve_parts(fx, args, tmp, places, times))
    if "crash" in args.parts:
        t0 = time.monotonic()
        results["crash"] = part_crash(tmp)
        times["crash"] = time.monotonic() - t0
    if "concurrent" in args.parts:
        t0 = time.monotonic()
        results["concurrent"] = part_concurrent(tmp, args.data, features, args, places)
        times["concurrent"] = time.monotonic() - t0
    results["times"] = times
    return results


def serve_parts(fx: Fixtures, args, tmp: Path, places: Places, times: dict) -> dict:
    """Parts 2 and 3, on one server over a copy of the index (they add images to it)."""
    if not {"http", "fuzz"} & set(args.parts):
        return {}
    index = tmp / "served"
    shutil.copytree(fx.index, index)
    port = free_port()
    server = start_server(index, port, 0)
    out = {}
    try:
        t0 = time.monotonic()
        if "http" in args.parts:
            first_id = json.loads(fx.annotations.read_text())["images"][0]["filename"]
            out["http"] = part_http(port, first_id, places)
            times["http"] = time.monotonic() - t0
        if "fuzz" in args.parts:
            t0 = time.monotonic()
            out["fuzz"] = part_fuzz(port, args, tmp, places)
            times["fuzz"] = time.monotonic() - t0
        tracebacks = server_log(server).count("Traceback")
    finally:
        server.terminate()
        server.wait(30)
    if "http" in out:
        out["http"]["tracebacks"] = tracebacks
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/flickr8k")
    ap.add_argument(
        "--features",
        type=Path,
        default=ROOT / ".cache/features/flickr8k-lite2",
        help="Feature store of Flickr8k val, to build part 5's index from (if there).",
    )
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--cli-images", type=int, default=30, help="Val images of the small index.")
    ap.add_argument("--jobs", type=int, default=2, help="Bad command lines run at once.")
    ap.add_argument(
        "--cli-timeout", type=float, default=120, help="Seconds before a command counts as hung."
    )
    ap.add_argument("--fuzz-examples", type=int, default=30)
    ap.add_argument("--fuzz-seconds", type=int, default=120, help="schemathesis's --max-time.")
    ap.add_argument(
        "--fuzz-checks",
        default="not_a_server_error,status_code_conformance,"
        "content_type_conformance,response_schema_conformance",
    )
    ap.add_argument("--live-images", type=int, default=200, help="Part 5's index.")
    ap.add_argument("--live-adds", type=int, default=30, help="Images of the folder added.")
    ap.add_argument("--live-uploads", type=int, default=10)
    ap.add_argument("--live-seconds", type=float, default=20)
    ap.add_argument("--no-write", action="store_true", help="Print, leave BENCHMARKS.md alone.")
    args = ap.parse_args()

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ldot-reliability-") as tmp:
        results = run_parts(args, Path(tmp))
    body = compose(results, args, time.monotonic() - t0)
    if not args.no_write:
        write_section("reliability", body)
    print(body)


if __name__ == "__main__":
    main()
