"""Promotion, rollback and the challenger: moving the registry aliases, with an audit trail.

The gate runs before the lock (it takes minutes); the alias change runs under the audit lock
and only if the champion is still the one the candidate was judged against. If another
promotion won in between, this one is recorded as a conflict and refused: a verdict against an
old champion says nothing about the new one.
"""

from __future__ import annotations

import getpass
import logging
from dataclasses import dataclass

from mlflow.entities.model_registry import ModelVersion

from genloop.services.audit import AuditLog
from genloop.services.config import GenloopConfig
from genloop.services.evaluation_report import EvaluationReport
from genloop.services.gate import evaluate
from genloop.services.registry import Registry
from genloop.training.errors import UserInputError

logger = logging.getLogger(__name__)


class PromotionRefused(RuntimeError):
    """The gate rejected the candidate, or the champion changed while it was being judged."""

    def __init__(self, message: str, report: EvaluationReport | None = None):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Roles:
    champion: str | None
    previous: str | None


def _actor(actor: str | None) -> str:
    if actor:
        return actor
    try:
        return getpass.getuser()
    except OSError:
        return "unknown"


def _version(version: ModelVersion | None) -> str | None:
    return str(version.version) if version is not None else None


def roles(config: GenloopConfig) -> Roles:
    """Champion and previous, read together: never a half-applied promotion."""
    registry, audit = Registry(config), AuditLog(config.state_db)
    with audit.shared():
        return Roles(champion=_version(registry.alias_version("champion")),
                     previous=_version(registry.alias_version("previous")))


def _move_aliases(registry: Registry, champion: str, previous: str | None) -> None:
    """Set champion (and previous); on failure put both back as they were."""
    before = Roles(_version(registry.alias_version("champion")), _version(registry.alias_version("previous")))
    try:
        if previous is not None:
            registry.client.set_registered_model_alias(registry.name, "previous", previous)
        elif before.previous is not None:
            registry.client.delete_registered_model_alias(registry.name, "previous")
        registry.client.set_registered_model_alias(registry.name, "champion", champion)
    except Exception:
        for alias, version in (("champion", before.champion), ("previous", before.previous)):
            if version is not None:
                registry.client.set_registered_model_alias(registry.name, alias, version)
        raise


def promote(
    config: GenloopConfig, ref: str, *, force: bool = False, reason: str = "", actor: str | None = None
) -> EvaluationReport | None:
    """Make ``ref`` the champion if it passes the gate (or with ``force`` and a reason)."""
    if force and not reason.strip():
        raise UserInputError("--force skips the gate and needs --reason saying why")
    registry, audit = Registry(config), AuditLog(config.state_db)
    who = _actor(actor)
    candidate = registry.resolve(ref)
    candidate_version = str(candidate.version)
    judged_against = _version(registry.alias_version("champion"))
    if judged_against == candidate_version:
        raise UserInputError(f"v{candidate_version} is already the champion")

    report = None if force else evaluate(config, candidate_version)
    action = "force-promote" if force else "promote"
    with audit.exclusive() as connection:
        current = _version(registry.alias_version("champion"))
        if report is not None and not report.passed:
            outcome = "rejected"
        elif current != judged_against:
            outcome = "conflict"
        else:
            _move_aliases(registry, champion=candidate_version, previous=current)
            outcome = "promoted"
        audit.record(connection, actor=who, action=action, from_version=current, to_version=candidate_version,
                     outcome=outcome, reason=reason, report_id=report.id if report else None)
    if outcome == "rejected":
        assert report is not None, "only a gate report rejects"
        failed = "; ".join(f"{rule.rule}: {rule.reason}" for rule in report.rules if not rule.passed)
        raise PromotionRefused(f"v{candidate_version} rejected by the gate: {failed}", report)
    if outcome == "conflict":
        raise PromotionRefused(f"the champion changed from v{judged_against} to v{current} while v"
                               f"{candidate_version} was being judged; evaluate it again", report)
    logger.info("promoted v%s (previous v%s) by %s", candidate_version, judged_against, who)
    return report


def rollback(config: GenloopConfig, *, reason: str = "", actor: str | None = None) -> Roles:
    """Swap champion and previous: the old champion comes back, the rolled-back one stays reachable."""
    registry, audit = Registry(config), AuditLog(config.state_db)
    with audit.exclusive() as connection:
        champion = _version(registry.alias_version("champion"))
        previous = _version(registry.alias_version("previous"))
        if previous is None:
            raise UserInputError("no previous champion to roll back to")
        _move_aliases(registry, champion=previous, previous=champion)
        audit.record(connection, actor=_actor(actor), action="rollback", from_version=champion,
                     to_version=previous, outcome="rolled-back", reason=reason)
    return Roles(champion=previous, previous=champion)


def set_challenger(config: GenloopConfig, ref: str | None, *, reason: str = "", actor: str | None = None) -> str | None:
    """Name ``ref`` the challenger (shadow-served beside the champion), or clear it with None.

    No gate: a challenger answers no caller, it only earns evidence for a later promotion.
    """
    registry, audit = Registry(config), AuditLog(config.state_db)
    with audit.exclusive() as connection:
        before = _version(registry.alias_version("challenger"))
        if ref is None:
            if before is None:
                raise UserInputError("there is no challenger to clear")
            registry.client.delete_registered_model_alias(registry.name, "challenger")
            after, outcome = None, "cleared"
        else:
            after = str(registry.resolve(ref).version)
            if after == _version(registry.alias_version("champion")):
                raise UserInputError(f"v{after} is the champion; a challenger must be another version")
            registry.client.set_registered_model_alias(registry.name, "challenger", after)
            outcome = "set"
        audit.record(connection, actor=_actor(actor), action="challenger", from_version=before, to_version=after,
                     outcome=outcome, reason=reason)
    return after
