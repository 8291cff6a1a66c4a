"""`genloop generate`: a JSONL of prompts through the serving engine on real Ray Data."""

from __future__ import annotations

import asyncio
import json

from typer.testing import CliRunner

from genloop.services.cli import app
from genloop.services.registry import Registry
from genloop.serving.engine import GenerationRequest, SamplingParams
from genloop.serving.hf.engine import HFEngine
from genloop.training.errors import UserInputError


def _champion(config, folder, register_model) -> str:
    version = register_model(config, folder)
    registry = Registry(config)
    registry.client.set_registered_model_alias(registry.name, "champion", version)
    return version


def _cli(config, *args: str):
    """The CLI in-process (on the test's Ray). ``genloop`` turns a UserInputError into exit 2 with its
    message (tested by subprocess in test_training); here the exception itself is checked."""
    config_file = config.home.parent / "genloop.yaml"
    config_file.write_text(f"home: {config.home}\nserving:\n  replica_cpus: 0.5\n")
    return CliRunner().invoke(app, [*args, "--config", str(config_file)])


def test_generate_answers_every_line_in_order_as_the_engine_does(ray_cluster, genloop_config, make_tiny_model,
                                                                   register_model, tmp_path):
    model = make_tiny_model()
    version = _champion(genloop_config, model, register_model)
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"id": f"q{i}", "prompt": f"The statement number {i}", "temperature": 0, "max_tokens": 6}
             for i in range(40)]
    lines.append({"prompt": "word " * 500, "max_tokens": 4})  # longer than the context: refused, batch goes on
    prompts.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    output = tmp_path / "out" / "answers.jsonl"

    result = _cli(genloop_config, "generate", "--input", str(prompts), "--output", str(output), "--batch-size", "8")

    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in output.read_text().splitlines()]
    assert [a["id"] for a in answers] == [f"q{i}" for i in range(40)] + ["41"]
    assert all(a["model_version"] == version for a in answers)
    assert all(a["error"] is None and 0 < a["completion_tokens"] <= 6 for a in answers[:40])
    assert answers[40]["error"] and "context" in answers[40]["error"] and answers[40]["text"] is None

    async def direct(prompt: str) -> str:  # the serving engine, in-process: batch output must match it
        engine = HFEngine(model, version)
        await engine.load()
        try:
            request = GenerationRequest(prompt=prompt, params=SamplingParams(temperature=0, max_tokens=6))
            return (await engine.generate(request)).text
        finally:
            await engine.close()

    assert answers[7]["text"] == asyncio.run(direct("The statement number 7"))


def test_bad_input_line_is_a_clear_error_and_writes_nothing(ray_cluster, genloop_config, make_tiny_model,
                                                            register_model, tmp_path):
    _champion(genloop_config, make_tiny_model(), register_model)
    output = tmp_path / "answers.jsonl"
    cases = {
        '{"prompt": "fine"}\n{"text": "no prompt"}\n': "prompts.jsonl:2: 'prompt'",
        '{"prompt": "fine"}\nnot json\n': "prompts.jsonl:2: not JSON",
        '{"prompt": "x", "max_tokens": -3}\n': "prompts.jsonl:1: max_tokens",
        '{"prompt": "x", "frobnicate": 1}\n': "prompts.jsonl:1: frobnicate",
    }
    for text, message in cases.items():
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text(text)
        result = _cli(genloop_config, "generate", "--input", str(prompts), "--output", str(output))
        assert isinstance(result.exception, UserInputError), result.output
        assert message in str(result.exception)
        assert not output.exists()
    missing = _cli(genloop_config, "generate", "--input", str(tmp_path / "nope.jsonl"), "--output", str(output))
    assert isinstance(missing.exception, UserInputError) and "no such input file" in str(missing.exception)
