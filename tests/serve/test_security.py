"""Who may change the index: the cross-site and DNS-rebinding checks, the API key, and the
policy a bind address gets (`lightningdot.serve.security`)."""

import io

import pytest
from PIL import Image
from starlette.datastructures import Headers
from typer.testing import CliRunner

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lightningdot.cli import app as cli  # noqa: E402
from lightningdot.retrieval import Retriever  # noqa: E402
from lightningdot.serve import create_app, server  # noqa: E402
from lightningdot.serve.security import (  # noqa: E402
    HOW_TO_ENABLE,
    cross_site,
    is_loopback,
    is_write,
    write_policy,
)
from tests.serve.test_web import CHROMIUM, live_server  # noqa: E402, F401 (a fixture)

KEY = "s3cret-key"
HERE = "http://127.0.0.1:8000"  # the clients' base URL: Host is 127.0.0.1:8000


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), colour).save(buf, "PNG")
    return buf.getvalue()


def upload(colour="teal"):
    return {"files": (f"{colour}.png", png(colour), "image/png")}


@pytest.fixture
def retriever(index_dir):
    return Retriever.open(index_dir)


def client_for(retriever, host: str, key: str | None) -> TestClient:
    return TestClient(create_app(retriever, writes=write_policy(host, key)), base_url=HERE)


@pytest.fixture
def loopback(retriever):
    with client_for(retriever, "127.0.0.1", None) as c:
        yield c


@pytest.mark.parametrize(
    ("host", "loop"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LocalHost", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.4", False),
        ("example.com", False),
        ("localhost.example.com", False),
        ("", False),
    ],
)
def test_loopback_addresses(host, loop):
    assert is_loopback(host) is loop


def test_write_routes_are_every_method_but_reads_except_image_search():
    assert is_write("POST", "/images") and is_write("DELETE", "/images/a.png")
    assert is_write("PUT", "/anything-later")
    assert not is_write("POST", "/search/image")
    assert not any(is_write(m, "/images") for m in ("GET", "HEAD", "OPTIONS"))


def test_policy_by_bind_address_and_key():
    local = write_policy("127.0.0.1", None)
    assert local.enabled and local.api_key is None and "warning" not in local.message
    exposed = write_policy("0.0.0.0", None)
    assert not exposed.enabled and exposed.api_key is None
    assert exposed.message.startswith("warning:") and "0.0.0.0" in exposed.message
    assert HOW_TO_ENABLE in exposed.message and "disabled" in exposed.message
    for host in ("0.0.0.0", "localhost"):
        keyed = write_policy(host, KEY)
        assert keyed.enabled and keyed.api_key == KEY
        assert KEY not in keyed.message and KEY not in repr(keyed)
    assert write_policy("0.0.0.0", "  ").api_key is None  # a blank key is no key


@pytest.mark.parametrize(
    ("headers", "refused"),
    [
        ({}, False),  # curl, a script: no page can send it
        ({"origin": HERE}, False),
        ({"origin": "http://127.0.0.1:8000", "sec-fetch-site": "same-origin"}, False),
        ({"sec-fetch-site": "none"}, False),  # the user's own navigation
        ({"origin": "http://evil.example"}, True),
        ({"origin": "http://127.0.0.1:9999"}, True),  # another port is another origin
        ({"origin": "http://localhost:8000"}, True),  # and another name
        ({"origin": "null"}, True),  # a sandboxed frame or a file:// page
        ({"sec-fetch-site": "cross-site"}, True),
        ({"sec-fetch-site": "same-site"}, True),
        ({"origin": HERE, "sec-fetch-site": "cross-site"}, True),
    ],
)
def test_cross_site_by_origin_and_fetch_site(headers, refused):
    assert (cross_site(Headers({"host": "127.0.0.1:8000", **headers})) is not None) is refused


def test_origin_matches_a_host_without_port_by_its_scheme():
    """Behind a proxy that ends TLS: `Host: example.com`, `Origin: https://example.com`."""
    assert cross_site(Headers({"host": "example.com", "origin": "https://example.com"})) is None
    assert cross_site(Headers({"host": "example.com", "origin": "https://example.com:8443"}))
    assert cross_site(Headers({"host": "[::1]:8000", "origin": "http://[::1]:8000"})) is None


def test_cross_site_add_is_refused_before_anything_is_added(loopback, retriever):
    before = len(retriever.image_index)
    for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        r = loopback.post("/images", files=upload(), headers=headers)
        assert r.status_code == 403 and "cross-site request refused" in r.json()["detail"]
    assert len(retriever.image_index) == before


def test_same_origin_and_headerless_adds_pass_on_loopback(loopback, retriever):
    before = len(retriever.image_index)
    same = {"Origin": HERE, "Sec-Fetch-Site": "same-origin"}
    assert loopback.post("/images", files=upload("teal"), headers=same).status_code == 200
    assert loopback.post("/images", files=upload("navy")).status_code == 200  # curl
    assert len(retriever.image_index) == before + 2


def test_reads_stay_open_across_sites(loopback):
    evil = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
    assert loopback.get("/search", params={"q": "red"}, headers=evil).status_code == 200
    r = loopback.post("/search/image", files={"file": ("q.png", png("red"))}, headers=evil)
    assert r.status_code == 200


def test_a_browser_must_name_a_keyless_server_by_loopback(retriever):
    """DNS rebinding: a page at evil.example re-pointed to 127.0.0.1 is same-origin with itself."""
    with TestClient(create_app(retriever), base_url="http://evil.example:8000") as c:
        r = c.post("/images", files=upload(), headers={"Origin": "http://evil.example:8000"})
        assert r.status_code == 403 and "rebinding" in r.json()["detail"]
        assert c.post("/images", files=upload()).status_code == 200  # not a browser


def test_with_a_key_writes_need_it(retriever):
    with client_for(retriever, "127.0.0.1", KEY) as c:
        missing = c.post("/images", files=upload())
        assert missing.status_code == 401 and "need the API key" in missing.json()["detail"]
        assert missing.headers["www-authenticate"] == "Bearer"
        for wrong in ({"Authorization": "Bearer nope"}, {"X-API-Key": KEY[:-1]}):
            r = c.post("/images", files=upload(), headers=wrong)
            assert r.status_code == 401 and "wrong" in r.json()["detail"]
        assert c.post("/images", files=upload(), headers={"X-API-Key": KEY}).status_code == 200
        bearer = {"Authorization": f"bearer {KEY}"}
        assert c.post("/images", files=upload("navy"), headers=bearer).status_code == 200
        evil = {"Origin": "http://evil.example", "X-API-Key": KEY}
        assert c.post("/images", files=upload(), headers=evil).status_code == 403
        assert c.get("/search", params={"q": "red"}).status_code == 200  # reads need no key


def test_beyond_loopback_without_a_key_writes_are_off_and_reads_served(retriever):
    with client_for(retriever, "0.0.0.0", None) as c:
        r = c.post("/images", files=upload())
        assert r.status_code == 403 and HOW_TO_ENABLE in r.json()["detail"]
        assert c.delete("/images/img01.png").status_code == 403  # a later write route too
        assert c.get("/search", params={"q": "red"}).status_code == 200
        assert c.post("/search/image", files={"file": ("q.png", png("red"))}).status_code == 200
        assert c.get("/healthz").json()["writes"] == "off"
    with client_for(retriever, "0.0.0.0", KEY) as c:
        assert c.get("/healthz").json()["writes"] == "key"


def test_openapi_offers_the_key_on_write_routes_only(retriever):
    with client_for(retriever, "0.0.0.0", KEY) as c:
        schema = c.get("/openapi.json").json()
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert schema["paths"]["/images"]["post"]["security"]
    assert "security" not in schema["paths"]["/search/image"]["post"]
    assert "security" not in schema["paths"]["/search"]["get"]


def test_serve_warns_at_start_and_never_logs_the_key(index_dir, monkeypatch):
    ran, lines = [], []
    monkeypatch.setattr(server.uvicorn, "run", lambda app, **kw: ran.append(kw["host"]))
    server.serve_index(index_dir, host="0.0.0.0", log=lines.append)
    assert ran == ["0.0.0.0"] and any(line.startswith("warning:") for line in lines)
    lines.clear()
    server.serve_index(index_dir, host="0.0.0.0", log=lines.append, api_key=KEY)
    assert lines and not any("warning" in line or KEY in line for line in lines)


def test_cli_takes_the_key_from_the_environment(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(server, "serve_index", lambda *a, **kw: seen.update(kw))
    result = CliRunner().invoke(cli, ["serve", str(tmp_path)], env={"LDOT_API_KEY": KEY})
    assert result.exit_code == 0, result.output
    assert seen["api_key"] == KEY and KEY not in result.output


def test_serve_help_shows_the_api_key_option():
    result = CliRunner().invoke(cli, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "--api-key" in result.output and "LDOT_API_KEY" in result.output


EVIL_PAGE = """<script>
const form = new FormData();
form.append("files", new Blob([new Uint8Array(%s)], {type: "image/png"}), "evil.png");
fetch("%s/images", {method: "POST", body: form, mode: "no-cors"})
  .finally(() => { document.title = "sent"; });
</script>"""


@pytest.fixture
def open_browser():
    """Chromium without its Local Network Access checks, which keep other sites' pages from
    loopback by themselves: like Firefox, Safari or an older Chrome, it sends the request, so
    only the server can refuse it."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set LDOT_CHROMIUM)")
    args = ["--no-sandbox", "--disable-features=LocalNetworkAccessChecks"]
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        yield b
        b.close()


def test_in_a_browser_the_page_adds_and_another_site_cannot(live_server, open_browser, tmp_path):  # noqa: F811
    """The search page's own add passes on a key-less loopback server; the same multipart POST
    from a page of another site (it needs no CORS preflight) is refused."""
    import httpx

    page = open_browser.new_page()
    page.goto(live_server)
    page.wait_for_function("() => document.getElementById('info').textContent.includes('8 images')")
    (tmp_path / "teal.png").write_bytes(png("teal"))
    page.set_input_files("#image-add", str(tmp_path / "teal.png"))
    page.wait_for_function("() => document.getElementById('info').textContent.includes('9 ')")

    evil = open_browser.new_page()
    evil.route(
        "http://evil.example/",
        lambda r: r.fulfill(
            content_type="text/html", body=(EVIL_PAGE % (list(png("maroon")), live_server))
        ),
    )
    evil.goto("http://evil.example/")
    evil.wait_for_function("() => document.title === 'sent'")
    assert httpx.get(f"{live_server}/healthz").json()["images"] == 9
    metrics = httpx.get(f"{live_server}/metrics").text
    assert 'method="POST",route="unmatched",status="403"' in metrics  # refused by the server


def test_serve_refuses_an_address_in_use_and_ports_out_of_range(index_dir):
    import socket

    from typer.testing import CliRunner

    from lightningdot.cli import app

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = CliRunner().invoke(app, ["serve", str(index_dir), "--port", str(port)])
    assert r.exit_code == 2 and "address already in use" in r.output.lower(), r.output
    for bad in (["--port", "65536"], ["--max-batch", "0"], ["--max-upload-mb", "0"]):
        r = CliRunner().invoke(app, ["serve", str(index_dir), *bad])
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
