"""Drift of live prompts away from what the champion knows, measured with Evidently.

A prompt is described by what it looks like (length, word count, share of non-letters), by how
the champion's tokenizer copes with it (share of tokens left as raw bytes: text its merges never
saw) and by how surprised the champion is by it (mean negative log-likelihood per token). Those
descriptors, plus the text itself (Evidently's domain classifier on TF-IDF), are compared between
a reference sample and the current window with ``DataDriftPreset``. Numerical features use the
normed Wasserstein distance, which, unlike a p-value, does not call every tiny difference drift
once samples are large. Both samples are capped (``max_samples``, seeded), so cost and memory do
not grow with traffic; below ``min_samples`` on either side the verdict is "insufficient data",
never drift.
"""

from __future__ import annotations

import html
import logging
import math
import os
import random
import re
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("DO_NOT_TRACK", "1")  # Evidently's (UI-only) telemetry stays off

import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from genloop.monitoring import metrics
from genloop.monitoring.drift_settings import DriftSettings

logger = logging.getLogger(__name__)

FEATURES = ("prompt", "length", "word_count", "non_letter_percent", "byte_fallback_share", "surprise")
Verdict = Literal["drift", "no drift", "insufficient data"]
LATEST = "latest.json"  # the newest result in the report folder, what the metrics exporter reads
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")  # sentencepiece byte fallback


class FeatureDrift(BaseModel):
    feature: str
    method: str
    threshold: float
    score: float
    drifted: bool


class DriftResult(BaseModel):
    id: str = Field(description="drift-<UTC timestamp>, the report files' name.")
    created_at: datetime
    verdict: Verdict
    model_version: str = Field(description="Champion whose tokenizer and surprise describe the prompts.")
    reference: str = Field(description="Where the reference sample came from.")
    current: str = Field(description="The window of live traffic compared.")
    reference_samples: int
    current_samples: int
    drifted_share: float = 0.0
    drift_share: float
    features: list[FeatureDrift] = Field(default_factory=list)

    @property
    def drifted_features(self) -> list[str]:
        return [f.feature for f in self.features if f.drifted]


# --- descriptors ------------------------------------------------------------------------------
def byte_fallback_share(prompts: list[str], tokenizer: Any) -> list[float]:
    """Share of each prompt's tokens that are single raw bytes (byte-level BPE) or byte-fallback pieces."""
    shares = []
    for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]:
        tokens = tokenizer.convert_ids_to_tokens(ids)
        raw = sum(1 for t in tokens if len(t) == 1 or _BYTE_TOKEN.match(t))
        shares.append(raw / len(tokens) if tokens else 0.0)
    return shares


@torch.no_grad()
def surprise(prompts: list[str], model: torch.nn.Module, tokenizer: Any, batch_size: int = 32,
             max_tokens: int = 256) -> list[float]:
    """Mean negative log-likelihood per token (nats) of each prompt under ``model``, end-of-text first."""
    model.eval()
    device = next(model.parameters()).device
    prefix = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encoded = [(prefix + ids)[:max_tokens] for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    scores = [math.nan] * len(prompts)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths together
    for start in range(0, len(order), batch_size):
        rows = [i for i in order[start:start + batch_size] if len(encoded[i]) >= 2]
        if not rows:
            continue
        width = max(len(encoded[i]) for i in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[r, : len(encoded[i])] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:].to(device), reduction="none").cpu()
        scored = mask[:, 1:].bool()
        for r, i in enumerate(rows):
            scores[i] = float(nll[r][scored[r]].mean())
    return scores


def descriptors(model: torch.nn.Module, tokenizer: Any) -> list:
    """Evidently descriptors of the ``prompt`` column: its own text ones plus the champion's view."""
    from evidently.core.datasets import DatasetColumn
    from evidently.descriptors import CustomColumnDescriptor, NonLetterCharacterPercentage, TextLength, WordCount

    def raw_bytes(column: DatasetColumn) -> DatasetColumn:
        values = byte_fallback_share(column.data.tolist(), tokenizer)
        return DatasetColumn("num", pd.Series(values, index=column.data.index))

    def champion_surprise(column: DatasetColumn) -> DatasetColumn:
        values = surprise(column.data.tolist(), model, tokenizer)
        return DatasetColumn("num", pd.Series(values, index=column.data.index))

    return [
        TextLength("prompt", alias="length"),
        WordCount("prompt", alias="word_count"),
        NonLetterCharacterPercentage("prompt", alias="non_letter_percent"),
        CustomColumnDescriptor("prompt", raw_bytes, alias="byte_fallback_share"),
        CustomColumnDescriptor("prompt", champion_surprise, alias="surprise"),
    ]


# --- the report -------------------------------------------------------------------------------
def sample(prompts: list[str], limit: int, seed: int) -> list[str]:
    return prompts if len(prompts) <= limit else random.Random(seed).sample(prompts, limit)


def detect_drift(reference: list[str], current: list[str], *, model: torch.nn.Module, tokenizer: Any,
                 model_version: str, reference_label: str, current_label: str, settings: DriftSettings,
                 out_dir: Path) -> DriftResult:
    """Compare ``current`` prompts with ``reference``; write ``out_dir/<id>.json``, ``.html`` and ``latest.json``."""
    created = datetime.now(UTC)
    result = DriftResult(
        id=f"drift-{created:%Y%m%dT%H%M%S%fZ}", created_at=created, verdict="insufficient data",
        model_version=model_version, reference=reference_label, current=current_label,
        reference_samples=len(reference), current_samples=len(current), drift_share=settings.drift_share,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    if min(len(reference), len(current)) < settings.min_samples:
        logger.warning("drift: %d reference and %d current prompts, fewer than %d: insufficient data",
                       len(reference), len(current), settings.min_samples)
        _write(out_dir / f"{result.id}.html", _insufficient_html(result, settings))
    else:
        reference = sample(reference, settings.max_samples, settings.seed)
        current = sample(current, settings.max_samples, settings.seed + 1)
        result.reference_samples, result.current_samples = len(reference), len(current)
        snapshot = _evidently_report(reference, current, descriptors(model, tokenizer), settings)
        result.features = _feature_drift(snapshot.dict())
        result.drifted_share = sum(f.drifted for f in result.features) / len(result.features)
        result.verdict = "drift" if result.drifted_share >= settings.drift_share else "no drift"
        temporary = out_dir / f".{result.id}.html.tmp"
        snapshot.save_html(str(temporary))
        os.replace(temporary, out_dir / f"{result.id}.html")
    text = result.model_dump_json(indent=2)
    _write(out_dir / f"{result.id}.json", text)
    _write(out_dir / LATEST, text)
    publish(result)
    logger.info("drift: %s (%s)", result.verdict, ", ".join(result.drifted_features) or "no feature drifted")
    return result


def _evidently_report(reference: list[str], current: list[str], described_by: list, settings: DriftSettings):
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    def dataset(prompts: list[str]) -> Dataset:
        return Dataset.from_pandas(pd.DataFrame({"prompt": prompts}), descriptors=described_by,
                                   data_definition=DataDefinition(text_columns=["prompt"]))

    preset = DataDriftPreset(columns=list(FEATURES), drift_share=settings.drift_share, num_method="wasserstein",
                             num_threshold=settings.num_threshold, text_method="perc_text_content_drift")
    with warnings.catch_warnings():  # constant columns make numpy warn while plots are drawn
        warnings.simplefilter("ignore", RuntimeWarning)
        return Report([preset], include_tests=True).run(dataset(current), dataset(reference))


def _feature_drift(snapshot: dict) -> list[FeatureDrift]:
    """Per-column score, method, threshold and verdict from the snapshot (a FAILed drift test = drifted)."""
    failed = {test["metric_config"]["metric_id"] for test in snapshot["tests"] if str(test["status"]).endswith("FAIL")}
    features = []
    for metric in snapshot["metrics"]:
        config = metric["config"]
        if config["type"].endswith(":ValueDrift"):
            features.append(FeatureDrift(feature=config["column"], method=str(config["method"]),
                                         threshold=float(config["threshold"]), score=float(metric["value"]),
                                         drifted=metric["id"] in failed))
    return sorted(features, key=lambda f: FEATURES.index(f.feature) if f.feature in FEATURES else len(FEATURES))


def publish(result: DriftResult) -> None:
    """The result as gauges: score, threshold and drifted (0/1) per feature, and when it was measured."""
    for feature in result.features:
        metrics.DRIFT_SCORE.labels(feature.feature).set(feature.score)
        metrics.DRIFT_THRESHOLD.labels(feature.feature).set(feature.threshold)
        metrics.DRIFT_DETECTED.labels(feature.feature).set(int(feature.drifted))
    metrics.DRIFT_DETECTED.labels("dataset").set(int(result.verdict == "drift"))
    metrics.DRIFT_SAMPLES.labels("reference").set(result.reference_samples)
    metrics.DRIFT_SAMPLES.labels("current").set(result.current_samples)
    metrics.DRIFT_LAST_RUN.set(result.created_at.timestamp())


def read_latest(out_dir: Path) -> DriftResult | None:
    path = out_dir / LATEST
    return DriftResult.model_validate_json(path.read_text(encoding="utf-8")) if path.exists() else None


def _insufficient_html(result: DriftResult, settings: DriftSettings) -> str:
    return (f"<!doctype html><meta charset=utf-8><title>{result.id}</title><h1>Drift: insufficient data</h1>"
            f"<p>{result.reference_samples} reference and {result.current_samples} current prompts; at least "
            f"{settings.min_samples} of each are needed.</p><p>Reference: {html.escape(result.reference)}<br>"
            f"Current: {html.escape(result.current)}</p>")


def _write(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
