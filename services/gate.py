"""The evaluation gate: a candidate version against the champion, on the same held-out sets.

Sets: "current" is the gate part of the validation split of the candidate's dataset (the newest
data); "reference" is the gate parts of the validation splits of every dataset the champion and its
ancestors were trained on (what the service already does well). The gate part is two thirds of
each validation split, chosen by content hash (``training.cleaning.held_out_part``); training and
search choose on the rest, so that what they chose on is never what the gate judges. "live" is a
sample of the prompts callers sent in the last ``monitoring.drift_window``, when there are at least
``gate.min_live_prompts``.

The policy (``gate`` config) turns the metrics into one verdict with one reason per rule:
better on what is served now (the gain on current and reference, weighted by the share of live
prompts that look like each, ``monitoring.traffic``; on current alone without enough traffic),
no worse than ``max_regression`` on what was served before (reference) nor on the live prompts
themselves, and the absolute bounds. Weighting matters once traffic has moved: a candidate that
gains on the new domain and holds the old one passes, one that trades the old domain away does
not, and the weights say how much each side counts. The report (JSON + HTML under
reports/evaluations/, and in the candidate's MLflow run) shows the sets, weights and rules used,
and the verdict is tagged on the candidate version.
"""

from __future__ import annotations

import json
import logging
import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from mlflow.entities.model_registry import ModelVersion

from genloop.monitoring.traffic import traffic_shares
from genloop.services.config import GateConfig, GenloopConfig
from genloop.services.evaluation_report import EvaluationReport, ModelSummary, RuleResult, Sample, render_html
from genloop.services.files import atomic_write
from genloop.services.registry import Registry
from genloop.serving.inference_log import caller_prompts
from genloop.training.cleaning import GATE
from genloop.training.dataset_store import resolve_dataset
from genloop.training.errors import UserInputError
from genloop.training.evaluation import (
    BETTER,
    SetMetrics,
    evaluate_model,
    load_for_evaluation,
    make_prompts,
    model_size,
)

logger = logging.getLogger(__name__)


def _relative_change(candidate: float, champion: float, metric: str) -> float:
    """Improvement of candidate over champion as a fraction (positive = better)."""
    if champion == 0:
        return 0.0
    change = (champion - candidate) / abs(champion)
    return change if BETTER[metric] == "lower" else -change


def apply_policy(policy: GateConfig, metrics: dict[str, dict[str, SetMetrics]],
                 weights: dict[str, float] | None = None) -> list[RuleResult]:
    """One result per rule: better on what is served now (the weighted gain over the sets in
    ``weights``, else on current), no regression on reference nor on live, bounds on current."""
    results: list[RuleResult] = []
    primary = policy.primary_metric
    current = metrics["current"]

    def gain(set_name: str) -> tuple[float, float, float]:
        cand, champ = (getattr(metrics[set_name][who], primary) for who in ("candidate", "champion"))
        return cand, champ, _relative_change(cand, champ, primary)

    if "champion" in current:
        weights = {name: w for name, w in (weights or {"current": 1.0}).items() if name in metrics}
        if set(weights) == {"current"}:
            cand, champ, change = gain("current")
            rule, reason = (f"current.{primary} improves by ≥ {policy.min_improvement:.1%}",
                            f"candidate {cand:.4g} vs champion {champ:.4g}: {change:+.2%}")
        else:
            change = sum(w * gain(name)[2] for name, w in weights.items())
            shares = ", ".join(f"{name} {w:.0%}" for name, w in weights.items())
            rule = f"traffic-weighted {primary} ({shares}) improves by ≥ {policy.min_improvement:.1%}"
            reason = "; ".join(f"{name} {gain(name)[2]:+.2%}" for name in weights) + f" → {change:+.2%}"
        results.append(RuleResult(rule=rule, passed=change >= policy.min_improvement, reason=reason,
                                  margin=change - policy.min_improvement))
    for set_name in ("reference", "live"):
        if set_name in metrics and "champion" in metrics[set_name]:
            cand, champ, change = gain(set_name)
            results.append(RuleResult(
                rule=f"{set_name}.{primary} regresses by ≤ {policy.max_regression:.1%}",
                passed=change >= -policy.max_regression,
                reason=f"candidate {cand:.4g} vs champion {champ:.4g}: {change:+.2%}",
                margin=change + policy.max_regression,
            ))
    for metric, ceiling in policy.ceilings.items():
        value = getattr(current["candidate"], metric)
        results.append(RuleResult(rule=f"current.{metric} ≤ {ceiling:g}", passed=value <= ceiling,
                                  reason=f"candidate {value:.4g}", margin=(ceiling - value) / (abs(ceiling) or 1)))
    for metric, floor in policy.floors.items():
        value = getattr(current["candidate"], metric)
        results.append(RuleResult(rule=f"current.{metric} ≥ {floor:g}", passed=value >= floor,
                                  reason=f"candidate {value:.4g}", margin=(value - floor) / (abs(floor) or 1)))
    return results


def _held_out_texts(config: GenloopConfig, datasets: list[str], seed: int) -> list[str]:
    texts: list[str] = []
    for spec in datasets:
        dataset = resolve_dataset(config.datasets_dir, spec)  # UserInputError when it no longer exists
        texts.extend(dataset.held_out(GATE))  # never the part training selects checkpoints on
    if not texts:
        raise UserInputError(f"held-out sets of {', '.join(datasets)} are empty")
    random.Random(seed).shuffle(texts)
    return texts[: config.evaluation.max_texts]


def _live_set(config: GenloopConfig, set_sources: dict[str, list[str]],
              texts_by_set: dict[str, list[str]]) -> tuple[dict[str, float], str]:
    """Add the 'live' set (recent caller prompts) when there are enough, and weigh 'current' and
    'reference' by the share of those prompts that look like each; the weights and why."""
    policy, window = config.gate, config.monitoring.drift_window
    prompts = caller_prompts(config.inference_log_dir, since=datetime.now(UTC) - window) \
        if policy.live_prompts else []
    if len(prompts) < policy.min_live_prompts:
        return {"current": 1.0}, (f"{len(prompts)} live prompts in the last {window}, fewer than "
                                  f"{policy.min_live_prompts}: no live set, current alone must improve")
    random.Random(config.evaluation.seed).shuffle(prompts)
    prompts = prompts[: policy.live_prompts]
    set_sources["live"] = [f"inference log, last {window} ({len(prompts)} prompts)"]
    texts_by_set["live"] = prompts
    if not policy.traffic_weighting or "reference" not in texts_by_set:
        return {"current": 1.0}, f"{len(prompts)} live prompts scored as the live set; traffic weighting is off"
    weights = traffic_shares({"current": texts_by_set["current"], "reference": texts_by_set["reference"]},
                             prompts, config.monitoring.drift_prefix_words, config.evaluation.seed)
    return weights, (f"{len(prompts)} live prompts of the last {window} look like "
                     + " and ".join(f"{name} ({w:.0%})" for name, w in weights.items())
                     + " (domain classifier on character n-grams)")


@dataclass(frozen=True)
class GateSets:
    """What the gate scores a candidate on: held-out texts by set, the datasets (or log) they come
    from, and the traffic weights of the sets with the sentence that explains them."""

    sources: dict[str, list[str]]
    texts: dict[str, list[str]]
    weights: dict[str, float]
    traffic: str


def gate_sets(config: GenloopConfig, dataset: str, reference: list[str] | None) -> GateSets:
    """The sets for a candidate trained on ``dataset`` against a champion whose lineage trained on
    ``reference`` (None: no champion). A retrain asks too, before it trains: its checkpoints are
    scored with the weights the gate would use (``services.selection``)."""
    sources = {"current": [dataset]}
    if reference is not None:
        sources["reference"] = reference
    texts = {name: _held_out_texts(config, datasets, config.evaluation.seed) for name, datasets in sources.items()}
    if reference is None:
        return GateSets(sources, texts, {"current": 1.0}, "no champion: the candidate is judged by the absolute bounds")
    weights, traffic = _live_set(config, sources, texts)
    return GateSets(sources, texts, weights, traffic)


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

    if not candidate.tags.get("dataset"):
        raise UserInputError(f"v{candidate.version} has no dataset tag: it was not trained by genloop")
    sets = gate_sets(config, candidate.tags["dataset"],
                     registry.lineage_datasets(baseline) if baseline is not None else None)

    metrics: dict[str, dict[str, SetMetrics]] = {}
    samples: list[Sample] = []
    for set_name, texts in sets.texts.items():
        # Live prompts are short and have no reference continuation: the live set scores bits per byte.
        prompts = [] if set_name == "live" else make_prompts(
            texts, settings.prompts, settings.prompt_words, settings.reference_words, settings.seed)
        if not prompts and set_name != "live":
            logger.warning("no %s text is long enough for a prompt: continuation scores are 0", set_name)
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
        for prompt, cand_out, champ_out in list(zip(prompts, candidate_outputs, champion_outputs, strict=True))[
                : settings.samples_in_report]:
            samples.append(Sample(set=set_name, prompt=prompt.prompt, reference=prompt.reference,
                                  champion=champ_out, candidate=cand_out))

    rules = apply_policy(config.gate, metrics, sets.weights)
    report = EvaluationReport(
        id=f"eval-{datetime.now(UTC):%Y%m%dT%H%M%S}-v{candidate.version}-{uuid.uuid4().hex[:6]}",
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        candidate=_summary(candidate, candidate_model, registry),
        champion=_summary(baseline, champion_model, registry) if baseline is not None else None,
        sets=sets.sources,
        weights=sets.weights,
        traffic=sets.traffic,
        metrics=metrics,
        rules=rules,
        passed=all(rule.passed for rule in rules),
        samples=samples,
    )
    _publish(config, registry, candidate, report)
    return report


def _context(model) -> int:
    from genloop.training.models import context_length

    return context_length(model.config)


def _summary(version: ModelVersion, model, registry: Registry) -> ModelSummary:
    size = model_size(model, registry.local_path(version))
    return ModelSummary(version=str(version.version), dataset=version.tags.get("dataset", ""), **size)


def _publish(config: GenloopConfig, registry: Registry, candidate: ModelVersion, report: EvaluationReport) -> None:
    """Write the report (JSON + HTML, atomically), log it to the candidate's run, tag the verdict."""
    folder = config.reports_dir / "evaluations"
    json_path, html_path = folder / f"{report.id}.json", folder / f"{report.id}.html"
    atomic_write(json_path, json.dumps(report.model_dump(mode="json"), indent=2))
    atomic_write(html_path, render_html(report))
    if candidate.run_id:
        for path in (json_path, html_path):
            registry.client.log_artifact(candidate.run_id, str(path), "evaluation")
    registry.client.set_model_version_tag(registry.name, candidate.version, "evaluation_verdict", report.verdict)
    registry.client.set_model_version_tag(registry.name, candidate.version, "evaluation_report", report.id)
    logger.info("evaluation %s: v%s %s", report.id, candidate.version, report.verdict)
