"""/docs and /redoc work offline: their scripts, styles and icon come from this server."""

import re
from urllib.parse import urlsplit

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lightningdot.retrieval import Retriever  # noqa: E402
from lightningdot.serve import create_app  # noqa: E402
from tests.serve.test_web import browser, live_server  # noqa: E402, F401 (fixtures)

ASSET = re.compile(r"""<(?:script|link)\b[^>]*?\b(?:src|href)=["']([^"']+)["']""", re.I)


@pytest.fixture
def client(index_dir):
    with TestClient(create_app(Retriever.open(index_dir))) as c:
        yield c


@pytest.mark.parametrize(
    ("page", "kinds"),
    [("/docs", {"javascript", "css", "image/png"}), ("/redoc", {"javascript", "image/png"})],
)
def test_doc_pages_load_only_their_own_assets(client, page, kinds):
    r = client.get(page)
    assert r.status_code == 200
    urls = ASSET.findall(r.text)
    assert urls, r.text
    for url in urls:
        assert not urlsplit(url).scheme and not url.startswith("//"), url  # nothing off-site
        asset = client.get(url)
        assert asset.status_code == 200, url
        kinds = {k for k in kinds if k not in asset.headers["content-type"]}
    assert not kinds, f"{page} lacks a {kinds} asset"
    assert "fonts.googleapis" not in r.text and "cdn.jsdelivr" not in r.text


def test_swagger_ui_sends_nothing_to_the_online_validator(client):
    assert '"validatorUrl": null' in client.get("/docs").text


def test_swagger_ui_renders_the_api_with_every_outside_request_blocked(live_server, browser):  # noqa: F811
    """Swagger UI 4 shows "Unable to render this definition" for FastAPI's OpenAPI 3.1: this is
    the check that the bundled one reads it, in a browser that may reach only this server."""
    page = browser.new_page()
    outside = []

    def only_here(route):
        if route.request.url.startswith(live_server):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_here)
    page.goto(f"{live_server}/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=15_000)
    paths = set(page.locator(".opblock-summary-path").all_inner_texts())
    assert {"/search", "/search/image", "/images"} <= {p.strip() for p in paths}
    assert not outside, outside
