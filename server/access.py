"""Who may use the server: the ``Host`` header, the API key and the browser ``Origin``, checked for
every HTTP request and WebSocket before it reaches an endpoint (ASGI middleware).

* **Host** must be one of ``--allowed-hosts`` (default without ``--api-key``: localhost,
  127.0.0.1, ::1), so a web page cannot reach a local server through a DNS name it controls
  (DNS rebinding).
* **API key** (``--api-key``): ``Authorization: Bearer KEY``, ``X-API-Key: KEY`` or, for browsers'
  WebSockets, ``?api_key=KEY``. ``GET /health``, the page and the API docs need none.
* **Origin**: a browser sends one; it must be this server's own (the page it serves) or one of
  ``--allowed-origins``, so another site's page cannot open a session (cross-site WebSocket
  hijacking) or start jobs. Requests without ``Origin`` are not from a browser page and pass.

A refused HTTP request gets ``{"code", "detail"}`` with 401 (``unauthorized``) or 403
(``forbidden``); a refused WebSocket is accepted, gets one error frame and is closed with 1008.
"""

from __future__ import annotations

import hmac
import json
from urllib.parse import parse_qs, urlsplit

from server.config import ServerConfig
from server.protocol import ErrorCode, error_response

OPEN_PATHS = ("/health", "/docs", "/openapi.json", "/docs/oauth2-redirect")  # besides the page's files
PAGE_PREFIXES = ("/js/", "/vendor/")
PAGE_FILES = ("/", "/index.html", "/style.css", "/favicon.svg")
CLOSE_POLICY = 1008


class AccessGuard:
    """ASGI middleware applying the checks of the module docstring."""

    def __init__(self, app, config: ServerConfig) -> None:
        self.app = app
        self.config = config
        self.hosts = config.host_names
        self.origins = config.origins
        self.key = config.api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            status, code, message = refusal
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            await error_response(status, code, message, headers)(scope, receive, send)
        else:
            await _websocket_error(receive, send, *refusal)

    def refusal(self, scope) -> tuple[int, ErrorCode, str] | None:
        """(HTTP status, code, message) when the request may not pass, else None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self.hosts is not None and _host_name(host) not in self.hosts:
            return 403, ErrorCode.FORBIDDEN, (f"Host {host!r} is not one this server answers to; "
                                              "add it to --allowed-hosts")
        origin = headers.get("origin")
        method = scope.get("method", "GET")
        if origin is not None and (scope["type"] == "websocket" or method not in ("GET", "HEAD", "OPTIONS")):
            if not self.origin_allowed(origin, host, scope):
                return 403, ErrorCode.FORBIDDEN, (f"a page from {origin} may not use this server; add its "
                                                  "origin to --allowed-origins")
        if self.key and not (method in ("GET", "HEAD") and _is_open(scope["path"])):
            if not self.key_matches(headers, scope):
                return 401, ErrorCode.UNAUTHORIZED, ("this server needs its API key: 'Authorization: Bearer KEY', "
                                                     "'X-API-Key: KEY' or '?api_key=KEY'")
        return None

    def origin_allowed(self, origin: str, host: str, scope) -> bool:
        origin = origin.strip().lower().rstrip("/")
        if self.origins is None or origin in self.origins:
            return True
        parts = urlsplit(origin)
        secure = scope.get("scheme") in ("https", "wss")
        own = {f"{'https' if secure else 'http'}://{host.lower()}"}
        return parts.scheme in ("http", "https") and f"{parts.scheme}://{parts.netloc}" in own

    def key_matches(self, headers: dict[str, str], scope) -> bool:
        given = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if given is None:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            given = (query.get("api_key") or [None])[0]
        return given is not None and hmac.compare_digest(given.encode(), self.key)


def _host_name(host: str) -> str:
    """The name of a Host header, without its port (``[::1]:8000`` -> ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path in PAGE_FILES or path.startswith(PAGE_PREFIXES)




async def _websocket_error(receive, send, status: int, code: ErrorCode, message: str) -> None:
    event = await receive()
    if event["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": json.dumps({"type": "error", "code": code.value, "message": message})})
    await send({"type": "websocket.close", "code": CLOSE_POLICY, "reason": code.value})
