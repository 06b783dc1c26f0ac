"""Who may use the routes that change the index (today `POST /images`).

A write route is any request whose method is not GET, HEAD or OPTIONS, except the POSTs listed
in `READ_POSTS` (a query image is a read): a route added later is protected without being
named here, and a new POST that only reads must be listed to be open.

Three checks guard them, in one ASGI middleware (`WriteGuard`), before any body is read:
- cross-site: a multipart POST needs no CORS preflight, so without this any page the user
  visits could add images to a server on 127.0.0.1. Refused when `Origin` is not the
  request's own host or `Sec-Fetch-Site` says same-site / cross-site. A request with neither
  header is not from a browser (curl, a script), which no other site can drive.
- DNS rebinding: a page at evil.example whose name is re-pointed to 127.0.0.1 is same-origin
  with itself, so a key-less server also wants a browser to address it by a loopback name.
- the API key: required whenever one is set, and write routes are off on a bind beyond
  loopback without one (`write_policy`).
Reads stay open: they change nothing.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
READ_POSTS = frozenset({"/search/image"})  # POSTs that only read
HOW_TO_ENABLE = "start the server with --api-key or LDOT_API_KEY"
WRITES = "the routes that change the index (POST /images)"
SAME_ORIGIN_FETCH = frozenset({"same-origin", "none"})  # "none": the user's own navigation


@dataclass(frozen=True)
class WritePolicy:
    """What write routes demand; made by `write_policy`."""

    enabled: bool  # False: they answer 403 saying how to enable them
    api_key: str | None = field(repr=False)  # when set, they need it
    message: str  # the start-up line that says which of these holds (never the key)

    @property
    def mode(self) -> str:
        """ "key" (writes need the key), "open" (to same-origin requests) or "off"."""
        return "key" if self.api_key is not None else "open" if self.enabled else "off"


def is_loopback(host: str) -> bool:
    """`localhost` (and `*.localhost`, which browsers keep on this machine), 127.0.0.0/8, ::1,
    with or without IPv6 brackets."""
    host = host.strip().lower().removeprefix("[").removesuffix("]")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name other than localhost may resolve anywhere
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def write_policy(host: str, api_key: str | None) -> WritePolicy:
    """The policy of a server bound to `host`: a key, when given, is always required; without
    one, writes are open to same-origin requests on loopback and off anywhere else."""
    key = (api_key or "").strip() or None  # an empty key would match an empty header
    if key is not None:
        how = "Authorization: Bearer KEY or X-API-Key: KEY"
        return WritePolicy(True, key, f"{WRITES} need the API key ({how})")
    if is_loopback(host):
        return WritePolicy(True, None, f"{WRITES} take same-origin requests without a key")
    return WritePolicy(
        False,
        None,
        f"warning: {host} is not a loopback address and no API key is set, so {WRITES} are "
        f"disabled and only reads are served; {HOW_TO_ENABLE} to enable them",
    )


def is_write(method: str, path: str) -> bool:
    return method not in READ_METHODS and path not in READ_POSTS


def host_port(netloc: str, default_port: int) -> tuple[str, int] | None:
    """(host, port) of `host[:port]`; None when it does not parse."""
    try:
        parts = urlsplit(f"//{netloc}")
        return (parts.hostname or "", parts.port or default_port)
    except ValueError:
        return None


def cross_site(headers: Headers) -> str | None:
    """Why a browser's request comes from another site, or None when it does not."""
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site.lower() not in SAME_ORIGIN_FETCH:
        return f"Sec-Fetch-Site is {fetch_site}"
    origin = headers.get("origin")
    if origin is None:
        return None
    parts = urlsplit(origin)
    default_port = {"http": 80, "https": 443}.get(parts.scheme)
    if default_port is None:  # "null" (a sandboxed frame, a file:// page) or garbage
        return f"the Origin {origin} is not this server"
    # The Origin's default port is the one a Host without a port means: behind a proxy that
    # ends TLS the request arrives over http, and its own scheme would not match.
    ours = host_port(headers.get("host", ""), default_port)
    if ours is None or host_port(parts.netloc, default_port) != ours:
        return f"the Origin {origin} is not this server ({headers.get('host', 'no Host')})"
    return None


def key_sent(headers: Headers) -> list[bytes]:
    """The keys a request offers: a Bearer token and an X-API-Key header."""
    sent = []
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        sent.append(token.strip())
    if headers.get("x-api-key"):
        sent.append(headers["x-api-key"].strip())
    # Starlette decodes header bytes as latin-1; back to the bytes the client sent.
    return [s.encode("latin-1") for s in sent]


def rebinding(headers: Headers) -> str | None:
    """Why a browser's request to a key-less server may come through DNS rebinding: it names
    the server by something other than a loopback address."""
    if "origin" not in headers and "sec-fetch-site" not in headers:
        return None  # not a browser: no page can make it
    host = headers.get("host", "")
    if is_loopback((host_port(host, 0) or ("", 0))[0]):
        return None
    return (
        f"a browser must address a server without an API key as localhost, 127.0.0.1 or "
        f"[::1], not {host!r} (a DNS-rebinding page would look the same)"
    )


def refusal(policy: WritePolicy, headers: Headers) -> JSONResponse | None:
    """The answer to a write request that may not go on, or None when it may."""
    if not policy.enabled:
        return JSONResponse({"detail": f"{WRITES} are disabled: {HOW_TO_ENABLE}"}, 403)
    reason = cross_site(headers)
    if reason is not None:
        detail = f"cross-site request refused: {reason}; only this server's own pages may write"
        return JSONResponse({"detail": detail}, 403)
    if policy.api_key is None:
        reason = rebinding(headers)
        if reason is None:
            return None
        return JSONResponse({"detail": f"{reason}; {HOW_TO_ENABLE} to use other names"}, 403)
    return bad_key(policy.api_key.encode("utf-8"), key_sent(headers))


def bad_key(key: bytes, sent: list[bytes]) -> JSONResponse | None:
    if any(hmac.compare_digest(key, s) for s in sent):
        return None
    how = "send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
    detail = f"the API key is wrong; {how}" if sent else f"{WRITES} need the API key: {how}"
    return JSONResponse({"detail": detail}, 401, headers={"WWW-Authenticate": "Bearer"})


class WriteGuard:
    """ASGI middleware: a write request that `refusal` turns down gets its 403/401 here, before
    its body is read; every other request passes untouched."""

    def __init__(self, app: ASGIApp, policy: WritePolicy) -> None:
        self.app, self.policy = app, policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"].removeprefix(scope.get("root_path", ""))
            if is_write(scope["method"], path):
                answer = refusal(self.policy, Headers(scope=scope))
                if answer is not None:
                    await answer(scope, receive, send)
                    return
        await self.app(scope, receive, send)
