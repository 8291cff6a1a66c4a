"""The evaluation gate: a candidate version against the champion, on the same held-out sets.

Sets: "current" is the validation split of the candidate's dataset (the newest data); "reference"
is the validation splits of every dataset the champion and its ancestors were trained on (what
the service already does well). The policy (``gate`` config) turns the metrics into one verdict
with one reason per rule; the report is kept (JSON + HTML under reports/evaluations/, and in the
candidate's MLflow run) and the verdict is tagged on the candidate version.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
from mlflow.entities.model_registry import ModelVersion
from pydantic import BaseModel, Field

from services.config import GateConfig, GenloopConfig, UserInputError
from services.evaluation_report import render_html
from services.registry import Registry
from training.datasets import resolve_dataset
from training.evaluation import (
    LOWER_IS_BETTER,
    SetMetrics,
    evaluate_model,
    load_for_evaluation,
    make_prompts,
    model_size,
)

logger = logging.getLogger(__name__)


class RuleResult(BaseModel):
    rule: str = Field(description="Human-readable rule, e.g. 'current.bits_per_byte improves ≥ 1%'.")
    passed: bool
    reason: str = Field(description="Why it passed or failed, with the numbers.")


class Sample(BaseModel):
    set: str
    prompt: str
    reference: str
    champion: str | None
    candidate: str


class ModelSummary(BaseModel):
    version: str
    dataset: str
    parameters: int
    size_on_disk_bytes: int


class EvaluationReport(BaseModel):
    id: str
    created_at: str
    candidate: ModelSummary
    champion: ModelSummary | None
    sets: dict[str, list[str]] = Field(description="Held-out set name → dataset versions it is drawn from.")
    metrics: dict[str, dict[str, SetMetrics]] = Field(description="set → 'candidate'/'champion' → metrics.")
    rules: list[RuleResult]
    passed: bool
    samples: list[Sample]

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "fail"


def _relative_change(candidate: float, champion: float, metric: str) -> float:
    """Improvement of candidate over champion as a fraction (positive = better)."""
    if champion == 0:
        return 0.0
    change = (champion - candidate) / abs(champion)
    return change if metric in LOWER_IS_BETTER else -change


def apply_policy(policy: GateConfig, metrics: dict[str, dict[str, SetMetrics]]) -> list[RuleResult]:
    """One result per rule: improvement on current, no regression on reference, bounds on current."""
    results: list[RuleResult] = []
    primary = policy.primary_metric
    current = metrics["current"]
    if "champion" in current:
        cand, champ = getattr(current["candidate"], primary), getattr(current["champion"], primary)
        gain = _relative_change(cand, champ, primary)
        results.append(RuleResult(
            rule=f"current.{primary} improves by ≥ {policy.min_improvement:.1%}",
            passed=gain >= policy.min_improvement,
            reason=f"candidate {cand:.4g} vs champion {champ:.4g}: {gain:+.2%}",
        ))
    if "reference" in metrics:
        cand, champ = (getattr(metrics["reference"][who], primary) for who in ("candidate", "champion"))
        gain = _relative_change(cand, champ, primary)
        results.append(RuleResult(
            rule=f"reference.{primary} regresses by ≤ {policy.max_regression:.1%}",
            passed=gain >= -policy.max_regression,
            reason=f"candidate {cand:.4g} vs champion {champ:.4g}: {gain:+.2%}",
        ))
    for metric, ceiling in policy.ceilings.items():
        value = getattr(current["candidate"], metric)
        results.append(RuleResult(rule=f"current.{metric} ≤ {ceiling:g}", passed=value <= ceiling,
                                  reason=f"candidate {value:.4g}"))
    for metric, floor in policy.floors.items():
        value = getattr(current["candidate"], metric)
        results.append(RuleResult(rule=f"current.{metric} ≥ {floor:g}", passed=value >= floor,
                                  reason=f"candidate {value:.4g}"))
    return results


def _lineage_datasets(registry: Registry, version: ModelVersion) -> list[str]:
    """Datasets of ``version`` and its ancestors (warm starts carry what their parents learned)."""
    datasets: list[str] = []
    seen: set[str] = set()
    current: ModelVersion | None = version
    while current is not None and current.version not in seen:
        seen.add(current.version)
        dataset = current.tags.get("dataset")
        if dataset and dataset not in datasets:
            datasets.append(dataset)
        parent = current.tags.get("parent_version")
        current = registry.resolve(parent) if parent else None
    return datasets


def _held_out_texts(config: GenloopConfig, datasets: list[str], seed: int) -> list[str]:
    texts: list[str] = []
    for spec in datasets:
        dataset = resolve_dataset(config.datasets_dir, spec)  # UserInputError when it no longer exists
        texts.extend(pq.read_table(dataset.validation_path, columns=["text"]).column("text").to_pylist())
    if not texts:
        raise UserInputError(f"held-out sets of {', '.join(datasets)} are empty")
    random.Random(seed).shuffle(texts)
    return texts[: config.evaluation.max_texts]


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8") as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


def evaluate(config: GenloopConfig, candidate_ref: str, against: str = "champion") -> EvaluationReport:
    """Evaluate ``candidate_ref`` against ``against`` (an alias or version; may be unset)."""
    registry = Registry(config)
    candidate = registry.resolve(candidate_ref)
    baseline = registry.alias_version(against) if against in ("champion", "previous", "challenger") \
        else registry.resolve(against)
    if baseline is not None and str(baseline.version) == str(candidate.version):
        raise UserInputError(f"v{candidate.version} is the {against}: nothing to compare it with")

    settings = config.evaluation
    candidate_model, candidate_tokenizer = load_for_evaluation(registry.local_path(candidate))
    champion_model = champion_tokenizer = None
    if baseline is not None:
        champion_model, champion_tokenizer = load_for_evaluation(registry.local_path(baseline))

    set_sources = {"current": [candidate.tags.get("dataset", "")]}
    if not set_sources["current"][0]:
        raise UserInputError(f"v{candidate.version} has no dataset tag: it was not trained by genloop")
    if baseline is not None:
        set_sources["reference"] = _lineage_datasets(registry, baseline)

    metrics: dict[str, dict[str, SetMetrics]] = {}
    samples: list[Sample] = []
    for set_name, datasets in set_sources.items():
        texts = _held_out_texts(config, datasets, settings.seed)
        prompts = make_prompts(texts, settings.prompts, settings.prompt_words, settings.reference_words,
                               settings.seed)
        kwargs = dict(stride=settings.stride, max_new_tokens=settings.max_new_tokens,
                      reference_words=settings.reference_words)
        metrics[set_name] = {}
        candidate_metrics, candidate_outputs = evaluate_model(
            candidate_model, candidate_tokenizer, texts, prompts,
            block_size=_context(candidate_model), **kwargs)
        metrics[set_name]["candidate"] = candidate_metrics
        champion_outputs: list[str | None] = [None] * len(prompts)
        if champion_model is not None:
            metrics[set_name]["champion"], champion_outputs = evaluate_model(
                champion_model, champion_tokenizer, texts, prompts, block_size=_context(champion_model), **kwargs)
        for prompt, cand_out, champ_out in list(zip(prompts, candidate_outputs, champion_outputs))[
                : settings.samples_in_report]:
            samples.append(Sample(set=set_name, prompt=prompt.prompt, reference=prompt.reference,
                                  champion=champ_out, candidate=cand_out))

    rules = apply_policy(config.gate, metrics)
    report = EvaluationReport(
        id=f"eval-{datetime.now(UTC):%Y%m%dT%H%M%S}-v{candidate.version}-{uuid.uuid4().hex[:6]}",
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        candidate=_summary(candidate, candidate_model, registry),
        champion=_summary(baseline, champion_model, registry) if baseline is not None else None,
        sets=set_sources,
        metrics=metrics,
        rules=rules,
        passed=all(rule.passed for rule in rules),
        samples=samples,
    )
    _publish(config, registry, candidate, report)
    return report


def _context(model) -> int:
    from training.models import context_length

    return context_length(model.config)


def _summary(version: ModelVersion, model, registry: Registry) -> ModelSummary:
    size = model_size(model, registry.local_path(version))
    return ModelSummary(version=str(version.version), dataset=version.tags.get("dataset", ""), **size)


def _publish(config: GenloopConfig, registry: Registry, candidate: ModelVersion, report: EvaluationReport) -> None:
    """Write the report (JSON + HTML, atomically), log it to the candidate's run, tag the verdict."""
    folder = config.reports_dir / "evaluations"
    json_path, html_path = folder / f"{report.id}.json", folder / f"{report.id}.html"
    _atomic_write(json_path, json.dumps(report.model_dump(mode="json"), indent=2))
    _atomic_write(html_path, render_html(report))
    if candidate.run_id:
        for path in (json_path, html_path):
            registry.client.log_artifact(candidate.run_id, str(path), "evaluation")
    registry.client.set_model_version_tag(registry.name, candidate.version, "evaluation_verdict", report.verdict)
    registry.client.set_model_version_tag(registry.name, candidate.version, "evaluation_report", report.id)
    logger.info("evaluation %s: v%s %s", report.id, candidate.version, report.verdict)
