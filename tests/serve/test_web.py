"""The web page in a real browser: headless Chromium, driven by Playwright, against a live server.

Needs Debian's `chromium` (set up by `make test` where it may install packages) and the
`playwright` package; without them the test is skipped, saying which is missing.
"""

import dataclasses
import json
import os
import threading
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("LDOT_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(os.environ.get("LDOT_TEST_ARTIFACTS", "test-artifacts"))


@contextmanager
def serving(index_dir: Path, reranker: Path):
    """A live server on `index_dir` in a thread; yields its base URL."""
    uvicorn = pytest.importorskip("uvicorn")
    from lightningdot.retrieval import Retriever
    from lightningdot.serve import create_app

    retriever = Retriever.open(index_dir, reranker=str(reranker))
    server = uvicorn.Server(
        uvicorn.Config(create_app(retriever), host="127.0.0.1", port=0, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def live_server(index_dir):
    with serving(index_dir, index_dir.parent / "rr") as url:
        yield url


@pytest.fixture
def explain_server(corpus_dir, tmp_path):
    """A live server on the tiny index made by a mean-pooled model: with [CLS] pooling, as in
    `index_dir`, the first token carries a caption's whole score and no word has a weight."""
    from lightningdot.config import RerankerConfig
    from lightningdot.data import read_karpathy
    from lightningdot.index.build import build_index
    from lightningdot.model.checkpoint import save_model, save_reranker
    from lightningdot.model.encoders import BiEncoder
    from lightningdot.model.reranker import Reranker
    from tests.helpers import tiny_model_config

    cfg = tiny_model_config()
    model = BiEncoder(dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, pooling="mean")))
    model.init_pretrained()
    root = tmp_path / "mean"
    save_model(root / "model", model.eval())
    save_reranker(root / "rr", Reranker(model, RerankerConfig()), str(root / "model"))
    corpus = read_karpathy(corpus_dir / "captions.json", "train")
    build_index(model, str(root / "model"), corpus, corpus_dir / "images", root / "ix")
    with serving(root / "ix", root / "rr") as url:
        yield url


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set LDOT_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        # Chromium's sandbox cannot start as root, as in CI containers.
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


def loaded_page(browser, url: str, height: int = 800):
    """The page at `url` once it shows the tiny index, and the list its script errors go to."""
    page = browser.new_page(viewport={"width": 1100, "height": height})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_function("() => document.getElementById('info').textContent.includes('8 images')")
    return page, errors


ALL_THUMBNAILS_DRAWN = """() => {
    const imgs = [...document.querySelectorAll('#results img')];
    return imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0);
}"""


def test_search_page_shows_thumbnails_scores_and_timings(live_server, browser, corpus_dir):
    page, errors = loaded_page(browser, live_server)
    page.fill("#q", "a red picture")
    page.press("#q", "Enter")
    page.wait_for_function(ALL_THUMBNAILS_DRAWN, timeout=15_000)
    figures = page.locator("#results figure")
    assert figures.count() == 8  # every image of the tiny index, best first
    assert page.locator("#results .score").first.inner_text().replace(".", "").lstrip("-").isdigit()
    assert "encode" in page.inner_text("#status") and "total" in page.inner_text("#status")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "search-page.png"), full_page=True)

    # Re-ranking is one click away and shows its own stage.
    page.check("#rerank")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('rerank')")

    # An image query lists captions and similar images.
    page.set_input_files("#image-query", str(corpus_dir / "images" / "img03.png"))
    page.wait_for_selector("#captions li")
    page.wait_for_function(ALL_THUMBNAILS_DRAWN, timeout=15_000)
    assert page.locator("#captions li").count() > 0
    page.screenshot(path=str(ARTIFACTS / "image-query.png"), full_page=True)
    assert not errors, errors


def test_example_queries_search_and_warnings_show(live_server, browser):
    page, errors = loaded_page(browser, live_server)
    # The tiny model reads English: its examples and placeholder are English.
    examples = page.locator("#example-queries button")
    assert examples.count() == 3 and examples.first.inner_text() in page.get_attribute(
        "#q", "placeholder"
    )
    examples.first.click()
    page.wait_for_function(ALL_THUMBNAILS_DRAWN, timeout=15_000)
    assert page.input_value("#q") == examples.first.inner_text()
    # A script outside the vocabulary is answered, with the server's warning in the status.
    page.fill("#q", "ᱚᱞ ᱪᱤᱠᱤ")
    page.press("#q", "Enter")
    page.wait_for_function(
        "() => document.getElementById('status').textContent.includes('warning')"
    )
    assert "vocabulary" in page.inner_text("#status")
    assert page.locator("#results figure").count() == 8
    assert not errors, errors


# Per result canvas: its image id, whether it shows, the regions it drew, and the alpha of its
# pixel at the centre of each box (mapped as the page maps them, through object-fit: cover).
HEAT_PIXELS = """() => [...document.querySelectorAll('#results figure')].map((figure) => {
    const canvas = figure.querySelector('canvas.heat');
    const img = figure.querySelector('img');
    if (!canvas) return { id: figure.title, canvas: false };
    const w = canvas.clientWidth, h = canvas.clientHeight;
    const visible = w > 0 && h > 0;
    const scale = Math.max(w / img.naturalWidth, h / img.naturalHeight);
    const dw = img.naturalWidth * scale, dh = img.naturalHeight * scale;
    const ratio = canvas.width / Math.max(w, 1);
    const ctx = canvas.getContext('2d');
    const alphaAt = (x, y) => ctx.getImageData(
        Math.floor((x * dw + (w - dw) / 2) * ratio), Math.floor((y * dh + (h - dh) / 2) * ratio),
        1, 1).data[3];
    return { id: figure.title, canvas: true, visible, drawn: Number(canvas.dataset.drawn),
             alphaAt: JSON.parse(figure.dataset.centres || '[]').map(([x, y]) => alphaAt(x, y)) };
})"""

ALL_HEAT_DRAWN = """() => {
    const figures = [...document.querySelectorAll('#results figure')];
    return figures.length > 0 && figures.every((f) => {
        const c = f.querySelector('canvas.heat');
        return c && c.width > 0 && f.querySelector('img').complete;
    });
}"""


def strongest_word(tokens: dict) -> tuple[str, float]:
    """The word (its "##" pieces joined, special tokens left out) of the largest weight."""
    words: list[list] = []
    for token, weight in zip(tokens["tokens"], tokens["weights"], strict=True):
        if token in ("[CLS]", "[SEP]", "[PAD]"):
            continue
        if token.startswith("##") and words:
            words[-1][0] += token[2:]
            words[-1][1] += weight
        else:
            words.append([token, weight])
    word, weight = max(words, key=lambda w: w[1])
    return word, weight


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def test_why_toggle_tints_matching_regions_and_marks_strongest_words(
    explain_server, browser, corpus_dir
):
    page, errors = loaded_page(browser, explain_server, 900)

    # A query made with the toggle off has no overlays; turning it on asks again, explained.
    page.fill("#q", "a red picture")
    page.press("#q", "Enter")
    page.wait_for_function(ALL_THUMBNAILS_DRAWN, timeout=15_000)
    assert page.locator("#results canvas.heat").count() == 0
    with page.expect_response(lambda r: "/search?" in r.url and "explain=1" in r.url):
        page.check("#explain")
    page.wait_for_function(ALL_HEAT_DRAWN, timeout=15_000)
    assert page.locator("#results figure").count() == 8
    assert page.locator("#results canvas.heat").count() == 8  # one per result
    assert "deletion-gradient" in page.inner_text("#images-note") or "state-similarity" in (
        page.inner_text("#images-note")
    )

    # What the server says about each result, to check the drawing against.
    params = urllib.parse.urlencode({"q": "a red picture", "k": 20, "rerank": 0, "explain": 1})
    regions = {
        h["id"]: h["regions"] for h in get_json(f"{explain_server}/search?{params}")["results"]
    }
    for figure in page.locator("#results figure").all():
        boxes = regions[figure.get_attribute("title")]["boxes"]
        centres = [[(x1 + x2) / 2, (y1 + y2) / 2] for x1, y1, x2, y2 in boxes]
        figure.evaluate("(f, c) => { f.dataset.centres = JSON.stringify(c); }", centres)
    heat = page.evaluate(HEAT_PIXELS)
    assert all(h["canvas"] and h["visible"] for h in heat), heat
    assert sum(h["drawn"] for h in heat) > 0, heat
    for h in heat:
        weights = regions[h["id"]]["weights"]
        assert h["drawn"] == sum(w > 0 for w in weights), (h, weights)
        for w, alpha in zip(weights, h["alphaAt"], strict=True):
            if w <= 0:
                assert alpha < 8, (h, weights)  # a region that lowered the score: no tint
            elif w == max(weights):
                assert alpha > 120, (h, weights)  # the strongest region: the deepest tint
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "explain-text-query.png"), full_page=True)

    # Off, the overlays hide; on again, they are back without asking the server again.
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.uncheck("#explain")
    assert not page.locator("#results canvas.heat").first.is_visible()
    assert not page.locator("#images-note").is_visible()
    page.check("#explain")
    page.wait_for_function(ALL_HEAT_DRAWN)
    assert page.evaluate(HEAT_PIXELS) == heat
    assert not [url for url in requests if "/search" in url], requests

    # Re-ranked results are explained too.
    with page.expect_response(lambda r: "rerank=0" not in r.url and "explain=1" in r.url):
        page.check("#rerank")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('rerank')")
    page.wait_for_function(ALL_HEAT_DRAWN, timeout=15_000)
    assert page.locator("#results canvas.heat").count() == 8
    with page.expect_response(lambda r: "/search?" in r.url and "rerank=0" in r.url):
        page.uncheck("#rerank")

    # An image query, explained: each caption as written, its strongest words marked.
    with page.expect_response(lambda r: r.url.endswith("/search/image")) as answer:
        page.set_input_files("#image-query", str(corpus_dir / "images" / "img03.png"))
    captions = answer.value.json()["captions"]
    assert captions and all(c["tokens"] for c in captions)
    page.wait_for_selector("#captions li")
    items = page.locator("#captions li")
    assert items.count() == len(captions)
    for item, hit in zip(items.all(), captions, strict=True):
        text = item.inner_text()
        assert text.endswith(hit["caption"]) and "[CLS]" not in text and "[SEP]" not in text
        marked = [m.inner_text() for m in item.locator("mark").all()]
        assert len(marked) <= 3
        word, weight = strongest_word(hit["tokens"])
        assert (word in marked) == (weight > 0), (word, weight, marked)
    marks = page.locator("#captions mark")
    assert marks.count() > 0
    assert all(m.inner_text().strip() for m in marks.all())
    assert marks.first.is_visible()
    page.screenshot(path=str(ARTIFACTS / "explain-image-query.png"), full_page=True)

    # Turned off, nothing is marked, and a new query asks for no explanations.
    page.uncheck("#explain")
    assert page.locator("#captions mark").first.evaluate(
        "(m) => getComputedStyle(m).backgroundColor"
    ) in ("rgba(0, 0, 0, 0)", "transparent")
    page.fill("#q", "a red picture")
    with page.expect_response(lambda r: "/search?" in r.url) as plain:
        page.press("#q", "Enter")
    assert "explain" not in plain.value.url
    page.wait_for_function(ALL_THUMBNAILS_DRAWN, timeout=15_000)
    assert page.locator("#results canvas.heat").count() == 0
    assert not errors, errors


def shown_ids(page) -> list[str]:
    return [f.get_attribute("title") for f in page.locator("#results figure").all()]


def test_pager_and_filter_show_the_pages_the_server_gives(live_server, browser):
    page, errors = loaded_page(browser, live_server)
    page.select_option("#k", "5")
    page.fill("#q", "a red picture")
    page.press("#q", "Enter")
    page.wait_for_function(ALL_THUMBNAILS_DRAWN, timeout=15_000)

    def server_ids(**extra) -> list[str]:
        params = urllib.parse.urlencode({"q": "a red picture", "k": 5, **extra})
        return [h["id"] for h in get_json(f"{live_server}/search?{params}")["results"]]

    # Page one of the tiny index's 8 images, then page two: the last 3, as the server pages them.
    first = shown_ids(page)
    assert first == server_ids() and len(first) == 5
    assert page.is_visible("#pager") and page.is_disabled("#previous")
    assert page.inner_text("#page-info") == "results 1–5"
    with page.expect_response(lambda r: "offset=5" in r.url):
        page.click("#next")
    page.wait_for_function("() => document.querySelectorAll('#results figure').length === 3")
    assert shown_ids(page) == server_ids(offset=5)
    assert not set(shown_ids(page)) & set(first)
    assert page.inner_text("#page-info") == "results 6–8"
    assert page.is_disabled("#next") and not page.is_disabled("#previous")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "second-page.png"), full_page=True)
    with page.expect_response(lambda r: "/search?" in r.url and "offset" not in r.url):
        page.click("#previous")
    page.wait_for_function("() => document.querySelectorAll('#results figure').length === 5")
    assert shown_ids(page) == first

    # A filter narrows the results to the images it passes; one page, so no pager.
    spec = json.dumps({"path": {"in": ["img01.png", "img04.png", "img06.png"]}})
    page.fill("#filter", spec)
    with page.expect_response(lambda r: "filter=" in r.url):
        page.press("#filter", "Enter")
    page.wait_for_function("() => document.querySelectorAll('#results figure').length === 3")
    assert shown_ids(page) == server_ids(filter=spec)
    assert sorted(shown_ids(page)) == ["img01.png", "img04.png", "img06.png"]
    assert page.is_hidden("#pager")

    # A filter the server refuses is said, and the results stay.
    page.fill("#filter", '{"nowhere": {"eq": 1}}')
    page.press("#filter", "Enter")
    page.wait_for_function("() => document.getElementById('status').className === 'error'")
    assert "nowhere" in page.inner_text("#status")
    assert len(shown_ids(page)) == 3
    assert not errors, errors
