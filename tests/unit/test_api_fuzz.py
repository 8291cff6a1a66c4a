"""Fuzzing the OpenAPI document the API publishes, in-process: the replica's ASGI app over the fake
engine (tests/fake_engine.py), driven by Schemathesis' engine, the one its CLI runs."""

from __future__ import annotations

from typing import Any

import schemathesis
from fake_engine import fake_replica
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events, from_schema

from genloop.serving.api import build_api

API_KEY = "sk-test-key"


def test_fuzzing_the_served_openapi_document_finds_no_server_error(tmp_path):
    """Schemathesis generates requests from the OpenAPI document the app publishes (valid ones and,
    in its coverage and fuzzing phases, ones that break the schema: wrong types, boundary and
    out-of-range numbers, odd strings) and sends each to the app. No answer may be a 5xx and none
    may hang; a wrapper around the app counts what was sent. The replica serves a version of its own,
    so the requests it counts leave the other tests' metrics alone."""
    statuses: list[int] = []
    config = SchemathesisConfig.from_dict({
        "seed": 1, "suppress-health-check": ["all"], "cache": {"enabled": False}, "workers": 1,
        "headers": {"Authorization": f"Bearer {API_KEY}"}, "request-timeout": 60,
        "checks": {"enabled": False, "not_a_server_error": {"enabled": True}},
        "generation": {"max-examples": 350, "database": "none"},
    })
    with fake_replica(model_version="fuzz", api_keys=[API_KEY], inference_log_dir=str(tmp_path / "log")) as replica:
        api = build_api(replica)

        async def counted(scope: dict, receive: Any, send: Any) -> None:
            async def answer(message: dict) -> None:
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])
                await send(message)

            await api(scope, receive, answer)

        schema = schemathesis.openapi.from_asgi("/openapi.json", counted, config=config,
                                                headers={"Authorization": f"Bearer {API_KEY}"})
        ran = list(from_schema(schema).execute())
    failed = [f"{event.phase.name} {event.label}: {event.status}" for event in ran
              if isinstance(event, events.ScenarioFinished) and event.status in (Status.FAILURE, Status.ERROR)]
    errors = [event for event in ran if isinstance(event, events.NonFatalError | events.FatalError)]
    finished = ran[-1]
    assert isinstance(finished, events.EngineFinished) and finished.stop_reason == "completed"
    assert not failed and not errors and not finished.failures, (failed, errors, finished.failures)
    assert len(statuses) >= 1000 and max(statuses) < 500, (len(statuses), sorted(set(statuses)))
