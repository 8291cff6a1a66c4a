"""What every HTTP request meets in a replica before the API sees it: an id, the key, a bounded body.

An ASGI middleware rather than FastAPI's ``@middleware("http")``: the body limit must count the
bytes actually received (a chunked upload has no Content-Length to trust), which only wrapping
``receive`` can do, and an error must become OpenAI's JSON shape even when it escapes every
handler. In order:

- a request id: the caller's ``x-request-id`` when it is a sane token (Ray Serve's proxy sets one
  on every request and returns it), else a new one, returned in that header; it is written into
  every 500's message and log line, and it is the inference-log row of every refused request;
- the API key, compared in constant time, on every path but ``public_paths`` once keys are set;
- at most ``max_per_client`` requests of one client (its API key, else its address) at once in this
  replica, 429 past it: Serve hands a replica ``max_ongoing_requests`` at a time, whoever sends them,
  so without this one client that opens many connections (or sends its bodies a byte at a time)
  holds every slot and everyone else waits;
- the body, read whole before the app runs: at most ``max_body_bytes`` (413 past it, whatever the
  transfer encoding) within ``body_timeout_s`` (408 after it), so a slow or endless upload costs
  its sender, not a request slot for as long as it likes;
- every answer that is not a success is reported to ``on_refused`` (the replica writes it to the
  inference log and the request counter), so the log holds refused requests as well as served ones.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from genloop.serving.protocol import error_body

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_BODY_METHODS = {"POST", "PUT", "PATCH"}

# (path, request id, status, seconds, client) for an answer that is not a 2xx.
Refused = Callable[[str, str, int, float, str], None]


def key_matches(header: str, keys: list[str]) -> bool:
    """``Authorization: Bearer <key>`` names one of ``keys``; every key is compared, in constant time,
    so the answer's timing tells nothing about how much of a guess was right."""
    token = header[7:].encode() if header.startswith("Bearer ") else b""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token, key.encode())
    return matched and bool(token)


@dataclass
class GuardSettings:
    """The guard's part of a replica's settings, and where refused requests are reported."""

    api_keys: list[str]
    public_paths: set[str]
    max_body_bytes: int
    body_timeout_s: float
    max_per_client: int | None = None
    on_refused: Refused | None = None


class RequestGuard:
    """ASGI middleware: ``app.add_middleware(RequestGuard, settings=GuardSettings(...))``."""

    def __init__(self, app: Any, settings: GuardSettings):
        self.app = app
        self.settings = settings
        self._in_flight: dict[str, int] = {}  # client → requests of it in this replica now

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        settings = self.settings
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        given = headers.get(REQUEST_ID_HEADER, "")
        request_id = given if _SANE_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status: list[int] = []

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                if request_id != given:  # one the caller (or Serve's proxy, which echoes it) did not send
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (REQUEST_ID_HEADER.encode(), request_id.encode())]}
            await send(message)

        async def answer(code: int, message: str, headers: tuple = ()) -> None:
            payload = json.dumps(error_body(code, message)).encode()
            await send_with_id({"type": "http.response.start", "status": code,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(payload)).encode()), *headers]})
            await send_with_id({"type": "http.response.body", "body": payload})

        path = scope["path"]
        client = headers.get("authorization", "") or (scope["client"][0] if scope.get("client") else "")
        held = self._in_flight.get(client, 0)
        self._in_flight[client] = held + 1
        try:
            if settings.api_keys and path not in settings.public_paths \
                    and not key_matches(headers.get("authorization", ""), settings.api_keys):
                await answer(401, "missing or invalid API key (Authorization: Bearer …)")
            elif settings.max_per_client is not None and held >= settings.max_per_client:
                await answer(429, f"more than {settings.max_per_client} requests of this client at once",
                             ((b"retry-after", b"1"),))
            elif scope["method"] in _BODY_METHODS:
                body = await self._read_body(receive, headers, settings, answer)
                if body is not None:
                    await self.app(scope, _replay(body, receive), send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:  # whatever escaped the handlers still gets OpenAI's error shape
            logger.exception("request %s %s failed", request_id, path)
            if not status:
                await answer(500, f"internal error; request id {request_id}")
        finally:
            if self._in_flight[client] == 1:
                del self._in_flight[client]
            else:
                self._in_flight[client] -= 1
            code = status[0] if status else 499  # no answer at all: the client went away first
            if not 200 <= code < 300 and settings.on_refused is not None:
                settings.on_refused(path, request_id, code, time.perf_counter() - started, client)

    @staticmethod
    async def _read_body(receive: Callable, headers: dict[str, str], settings: GuardSettings,
                         answer: Callable) -> bytes | None:
        """The whole body, or None once an error was answered (or the client left)."""
        limit = settings.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await answer(413, f"request body of {declared} bytes exceeds {limit}")
            return None
        parts, size = [], 0
        try:
            async with asyncio.timeout(settings.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        await answer(413, f"request body exceeds {limit} bytes")
                        return None
                    parts.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(parts)
        except TimeoutError:
            await answer(408, f"request body not received within {settings.body_timeout_s:g} s")
            return None


def _replay(body: bytes, receive: Callable) -> Callable:
    """A ``receive`` that gives the app the body already read, then waits for the disconnect as before."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> dict:
        return pending.pop() if pending else await receive()

    return replayed
