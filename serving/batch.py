"""Offline batch inference: a JSONL file of prompts through the serving engine, on Ray Data.

The same ``Engine`` the API serves runs inside a pool of Ray Data actors (one engine each, loaded
once), so a batch answers exactly as the endpoint would — same weights, tokenizer, sampling and
continuous batching — without going through HTTP. Every input line is validated before any model
is loaded: a bad line is the caller's error (exit 2, line number named), not a failed job an hour
in. A request the engine refuses (say, a prompt longer than the context) gets an ``error`` in its
output line, as OpenAI's batch API does, and the rest of the batch goes on. The output is written
to a temporary file and renamed, so it is either whole or absent.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray.data
from pydantic import ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from genloop.serving.engine import EngineError, GenerationRequest, SamplingParams
from genloop.serving.settings import ServerSettings
from genloop.training.errors import UserInputError


def read_prompts(path: Path, defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """Validated rows of ``path``: ``prompt`` (required), optional ``id``, and sampling fields.

    ``defaults`` are sampling fields for lines that do not set their own.
    """
    if not path.is_file():
        raise UserInputError(f"no such input file: {path}")
    rows = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserInputError(f"{where}: not JSON ({exc.msg})") from None
            if not isinstance(item, dict):
                raise UserInputError(f"{where}: each line must be a JSON object with a 'prompt'")
            prompt = item.pop("prompt", None)
            if not isinstance(prompt, str) or not prompt:
                raise UserInputError(f"{where}: 'prompt' must be a non-empty string")
            row_id = str(item.pop("id", number))
            try:
                params = SamplingParams.model_validate({**defaults, **item})
            except ValidationError as exc:
                error = exc.errors()[0]
                field = ".".join(str(part) for part in error["loc"]) or "line"
                raise UserInputError(f"{where}: {field}: {error['msg']}") from None
            if params.n != 1:
                raise UserInputError(f"{where}: n: batch inference makes one completion per line")
            rows.append({"id": row_id, "prompt": prompt, "params": params.model_dump_json()})
    if not rows:
        raise UserInputError(f"{path} holds no prompts")
    return rows


class _EngineActor:
    """One engine in a Ray Data actor, driven by the actor's own event loop between batches."""

    def __init__(self, settings: ServerSettings):
        self.version = settings.model_version
        self.loop = asyncio.new_event_loop()
        self.engine = settings.build_engine()
        self.loop.run_until_complete(self.engine.load())

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        async def answer(prompt: str, params: str) -> dict[str, Any]:
            request = GenerationRequest(prompt=prompt, params=SamplingParams.model_validate_json(params))
            try:
                self.engine.check_params(request.params)
                result = await self.engine.generate(request)
            except EngineError as exc:
                return {"text": None, "finish_reason": None, "prompt_tokens": 0, "completion_tokens": 0,
                        "error": str(exc)}
            return {"text": result.text, "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens, "error": None}

        async def answer_all() -> list[dict[str, Any]]:  # submitted together: the engine batches them
            return await asyncio.gather(*(answer(p, s) for p, s in zip(batch["prompt"], batch["params"], strict=True)))

        answers = self.loop.run_until_complete(answer_all())
        out: dict[str, list] = {"id": list(batch["id"]), "model_version": [self.version] * len(answers)}
        for key in ("text", "finish_reason", "prompt_tokens", "completion_tokens", "error"):
            out[key] = [a[key] for a in answers]
        return out


def generate_file(settings: ServerSettings, input_path: Path, output_path: Path, *, defaults: dict[str, Any],
                  concurrency: int = 1, batch_size: int = 32, replica_cpus: float = 1.0,
                  replica_gpus: float = 0.0, show_progress: bool = True) -> dict[str, int]:
    """Answer every prompt of ``input_path`` into ``output_path`` (JSONL, input order); returns counts."""
    rows = read_prompts(input_path, defaults)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size, 64))).map_batches(
        _EngineActor, fn_constructor_args=(settings,), batch_size=batch_size, batch_format="numpy",
        concurrency=concurrency, num_cpus=replica_cpus, num_gpus=replica_gpus,
    )
    output_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = output_path.with_name(f".{output_path.name}.tmp")
    counts = {"prompts": len(rows), "answered": 0, "errors": 0}
    try:
        with temporary.open("w", encoding="utf-8") as out, _progress(show_progress) as progress:
            task = progress.add_task("generating", total=len(rows))
            for answer in _rows(dataset):
                out.write(json.dumps(answer, ensure_ascii=False) + "\n")
                counts["errors" if answer["error"] else "answered"] += 1
                progress.advance(task)
        os.replace(temporary, output_path)
    finally:
        temporary.unlink(missing_ok=True)
    return counts


def _rows(dataset: ray.data.Dataset) -> Iterator[dict[str, Any]]:
    for row in dataset.iter_rows():
        yield {key: (value.item() if hasattr(value, "item") else value) for key, value in row.items()}


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=not enabled)
