"""Serve's own error answers in OpenAI's error shape, rewritten in Serve's HTTP proxy.

Some answers never reach a replica: past ``max_queued_requests`` the proxy's router raises
``BackPressureError`` and the proxy answers 429 itself, with a plain-text body ("Request dropped due
to backpressure ..."); so do its 503 (no replica running), 408 (``request_timeout_s``), 500 and
404 (no application at the path). No handler of our app can catch those, and an OpenAI client
reading such a body finds no ``error`` object in it. Serve's one hook into its proxy is the callback
named by ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` in the proxy's environment (``PROXY_ENV``;
a Ray that genloop starts passes it on, a cluster started elsewhere needs it set), which returns
Starlette middlewares to wrap the proxy's ASGI app: ``OpenAIErrors`` turns every
plain-text error answer into ``{"error": {...}}`` with the same status, headers (Retry-After) and
message. The app's own answers are JSON already and pass untouched, and so do the proxy's own routes
(``/-/healthz``, ``/-/routes``), which load balancers read as they are.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.middleware import Middleware

from genloop.serving.protocol import error_body

# The proxy's environment that installs ``OpenAIErrors``: set before Ray starts its processes.
PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "genloop.serving.proxy_errors.proxy_middlewares"}


def proxy_middlewares() -> list[Middleware]:
    """Serve's HTTP proxy callback: the middlewares it wraps its ASGI app in."""
    return [Middleware(OpenAIErrors)]


def _plain_text_error(message: dict) -> bool:
    if message["status"] < 400:
        return False
    content_type = next((value for name, value in message.get("headers", []) if name.lower() == b"content-type"), b"")
    return bytes(content_type).startswith(b"text/plain")


class OpenAIErrors:
    """ASGI middleware: a plain-text error answer, held until its body is whole, goes out as OpenAI's error JSON."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/-/"):
            await self.app(scope, receive, send)
            return
        held: dict | None = None
        body = b""

        async def rewrite(message: dict) -> None:
            nonlocal held, body
            if message["type"] == "http.response.start" and _plain_text_error(message):
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                await send(message)
                return
            body += message.get("body", b"")
            if message.get("more_body", False):
                return
            status = held["status"]
            payload = json.dumps(error_body(status, body.decode("utf-8", "replace").strip() or f"HTTP {status}"))
            encoded = payload.encode()
            headers = [(name, value) for name, value in held.get("headers", [])
                       if name.lower() not in (b"content-type", b"content-length")]
            await send({**held, "headers": [*headers, (b"content-type", b"application/json"),
                                            (b"content-length", str(len(encoded)).encode())]})
            await send({"type": "http.response.body", "body": encoded})

        await self.app(scope, receive, rewrite)
