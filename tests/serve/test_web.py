"""The web page in a real browser: headless Chromium, driven by Playwright, against a live server.

Needs Debian's `chromium` (set up by `make test` where it may install packages) and the
`playwright` package; without them the test is skipped, saying which is missing.
"""

import os
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("LDOT_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(os.environ.get("LDOT_TEST_ARTIFACTS", "test-artifacts"))


@pytest.fixture
def live_server(index_dir):
    uvicorn = pytest.importorskip("uvicorn")
    from lightningdot.retrieval import Retriever
    from lightningdot.serve import create_app

    retriever = Retriever.open(index_dir, reranker=str(index_dir.parent / "rr"))
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
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


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


ALL_THUMBNAILS_DRAWN = """() => {
    const imgs = [...document.querySelectorAll('#results img')];
    return imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0);
}"""


def test_search_page_shows_thumbnails_scores_and_timings(live_server, browser, corpus_dir):
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(live_server)
    page.wait_for_function("() => document.getElementById('info').textContent.includes('8 images')")
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
