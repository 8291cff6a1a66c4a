"""The request guard over real ASGI (httpx's ASGI transport into a FastAPI app carrying it)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from genloop.serving.guard import REQUEST_ID_HEADER, GuardSettings, RequestGuard, key_matches


@pytest.fixture
def app_and_refused():
    refused: list[tuple[str, int]] = []
    app = FastAPI()
    app.add_middleware(RequestGuard, settings=GuardSettings(
        api_keys=["sk-a", "sk-b"], public_paths={"/health"}, max_body_bytes=1000, body_timeout_s=0.5,
        max_per_client=2, on_refused=lambda path, rid, status, seconds, client: refused.append((path, status))))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/echo")
    async def echo(request: Request):
        return JSONResponse({"bytes": len(await request.body()), "id": request.state.request_id})

    @app.post("/boom")
    async def boom():
        raise RuntimeError("a bug")

    return app, refused


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://test")


KEY = {"Authorization": "Bearer sk-b"}


def test_keys_are_checked_except_on_public_paths(app_and_refused):
    app, refused = app_and_refused

    async def run():
        async with client(app) as c:
            return [(await c.get("/health")).status_code, (await c.post("/echo", content=b"x")).status_code,
                    (await c.post("/echo", content=b"x", headers={"Authorization": "Bearer sk-"})).status_code,
                    (await c.post("/echo", content=b"x", headers=KEY)).status_code]

    assert asyncio.run(run()) == [200, 401, 401, 200]
    assert refused == [("/echo", 401), ("/echo", 401)]
    assert not key_matches("Bearer ", [""]) and not key_matches("sk-a", ["sk-a"])


def test_the_body_limit_counts_bytes_received_whatever_the_encoding(app_and_refused):
    app, refused = app_and_refused

    async def chunks():
        for _ in range(100):  # 10 KB with no Content-Length: a chunked upload
            yield b"y" * 100

    async def run():
        async with client(app) as c:
            chunked = await c.post("/echo", content=chunks(), headers=KEY)
            declared = await c.post("/echo", content=b"z" * 1001, headers=KEY)
            fits = await c.post("/echo", content=b"z" * 1000, headers=KEY)
            return chunked, declared, fits

    chunked, declared, fits = asyncio.run(run())
    assert "content-length" not in chunked.request.headers
    assert chunked.status_code == 413 and chunked.json()["error"]["type"] == "invalid_request_error"
    assert declared.status_code == 413 and fits.json()["bytes"] == 1000
    assert refused == [("/echo", 413), ("/echo", 413)]


def test_a_body_that_does_not_arrive_in_time_gets_408(app_and_refused):
    app, refused = app_and_refused

    async def trickle():
        yield b"{"
        await asyncio.sleep(3)
        yield b"}"

    async def run():
        async with client(app) as c:
            return await c.post("/echo", content=trickle(), headers=KEY)

    answer = asyncio.run(run())
    assert answer.status_code == 408 and "within 0.5 s" in answer.json()["error"]["message"]
    assert refused == [("/echo", 408)]


def test_an_escaped_error_is_openai_shaped_with_the_request_id(app_and_refused):
    app, refused = app_and_refused

    async def run():
        async with client(app) as c:
            mine = await c.post("/echo", content=b"x", headers={**KEY, REQUEST_ID_HEADER: "trace-42"})
            odd = await c.post("/echo", content=b"x", headers={**KEY, REQUEST_ID_HEADER: "no spaces; please"})
            return mine, odd, await c.post("/boom", headers=KEY)

    mine, odd, boom = asyncio.run(run())
    assert mine.json()["id"] == "trace-42" and REQUEST_ID_HEADER not in mine.headers  # the caller has it
    assert odd.headers[REQUEST_ID_HEADER] != "no spaces; please"
    assert boom.status_code == 500 and boom.headers["content-type"] == "application/json"
    error = boom.json()["error"]
    assert error["type"] == "server_error" and boom.headers[REQUEST_ID_HEADER] in error["message"]
    assert refused == [("/boom", 500)]


def test_one_client_holds_at_most_its_share_of_the_replica(app_and_refused):
    """Two requests of one client wait on a slow handler; its third is refused at once with 429 and
    Retry-After, another client is not, and the slots come back once the first two finish."""
    app, refused = app_and_refused
    release = asyncio.Event()

    @app.post("/slow")
    async def slow():
        await release.wait()
        return {"ok": True}

    async def run():
        async with client(app) as c:
            held = [asyncio.create_task(c.post("/slow", content=b"x", headers=KEY)) for _ in range(2)]
            await asyncio.sleep(0.1)
            third = await c.post("/slow", content=b"x", headers=KEY)
            other = asyncio.create_task(c.post("/slow", content=b"x", headers={"Authorization": "Bearer sk-a"}))
            await asyncio.sleep(0.1)
            release.set()
            firsts = [(await task).status_code for task in held]
            again = await c.post("/echo", content=b"x", headers=KEY)
            return third, firsts, (await other).status_code, again.status_code

    third, firsts, other, again = asyncio.run(run())
    assert third.status_code == 429 and third.headers["retry-after"] == "1"
    assert third.json()["error"]["message"] == "more than 2 requests of this client at once"
    assert (firsts, other, again) == ([200, 200], 200, 200)
    assert refused == [("/slow", 429)]
