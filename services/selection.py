"""A retrain asks the gate's question while it trains, and keeps the checkpoint the gate will take.

A warm start's loss on the new data alone keeps falling while the old domain is forgotten, so the
checkpoint with the lowest new-domain loss is often one the gate refuses (a shift with more to
learn than the demo's forgot 3.4 % of the old domain and was refused). Instead every evaluation of
a retrain scores the new data's and the lineage's held-out texts, and turns the two losses into the
gate's verdict with the gate's own policy code (``gate.apply_policy``) and the traffic weights the
gate would use now (``gate.gate_sets``). A checkpoint that passes every rule with ``margin`` to
spare scores its gain on the gate's primary rule (the traffic-weighted improvement, less the
minimum the gate asks), so of those the one that learned the most wins: that is what the gate ranks
candidates by. Any other scores its closest rule's shortfall (< 0), so when none is safe the closest
to passing wins, and the rule that failed is named in the run's ``selection`` tag.

Why a margin: selection texts are not the gate's, and the two measure the same model up to half a
point apart (0.1 to 0.5 points of the old domain's bits per byte on the licence shift), so a
checkpoint that passes here narrowly may fail there. Why the gain and not the smallest margin (the
score before): the smallest margin is nearly always the old domain's, so it kept the checkpoint that
forgot least, not the one that learned most, and a search ranked by it kept a 48-step trial at −17.6 %
where a sweep run reached −26 % (``benchmarks/results/retrain_search_lr_1to3_licences.json``).

Only the rules a training loss can answer are asked: the primary metric and the bounds on bits per
byte and perplexity (a primary metric that needs generation, BLEU say, is asked as bits per byte
here and as itself by the gate), and no live set (the live prompts are the gate's to score).
Everything is scored on the validation splits' selection parts (``cleaning.held_out_part``), never
on the texts the gate scores.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from genloop.services.config import GateConfig, GenloopConfig
from genloop.services.gate import apply_policy, gate_sets
from genloop.training.cleaning import SELECTION
from genloop.training.dataset_store import resolve_dataset
from genloop.training.evaluation import SetMetrics

LOSS_METRICS = ("bits_per_byte", "perplexity")  # what a token loss gives without generating


def training_policy(policy: GateConfig) -> GateConfig:
    """The rules of ``policy`` a training loss can answer (see the module's docstring)."""
    primary = policy.primary_metric if policy.primary_metric in LOSS_METRICS else "bits_per_byte"
    return policy.model_copy(update={
        "primary_metric": primary,
        "ceilings": {name: value for name, value in policy.ceilings.items() if name in LOSS_METRICS},
        "floors": {name: value for name, value in policy.floors.items() if name in LOSS_METRICS},
    })


@dataclass(frozen=True)
class Selection:
    """What a retrain scores its checkpoints on beyond its own data's held-out texts ("current"):
    the lineage's ("reference"), with the gate's policy and weights."""

    sets: dict[str, list[str]]
    policy: GateConfig
    weights: dict[str, float]
    margin: float = 0.0  # room every rule must leave (``scheduler.selection_margin``)
    traffic: str = field(default="", compare=False)


def retrain_selection(config: GenloopConfig, dataset: str, lineage: list[str]) -> Selection:
    """The selection of a retrain on ``dataset`` from a champion whose lineage trained on ``lineage``."""
    gate = gate_sets(config, dataset, lineage)
    texts = [text for spec in lineage for text in resolve_dataset(config.datasets_dir, spec).held_out(SELECTION)]
    random.Random(config.evaluation.seed).shuffle(texts)  # every lineage dataset in the first blocks
    return Selection(sets={"reference": texts}, policy=training_policy(config.gate), weights=gate.weights,
                     margin=config.scheduler.selection_margin, traffic=gate.traffic)


def bits_per_nat(blocks: torch.Tensor, tokenizer: PreTrainedTokenizerBase) -> float:
    """The factor from a mean token loss (nats) on ``blocks`` to bits per UTF-8 byte of their text:
    predicted tokens / (bytes · ln 2), the bytes of the tokens after each block's first."""
    text_bytes = sum(len(tokenizer.decode(block[1:].tolist(), skip_special_tokens=True).encode("utf-8"))
                     for block in blocks)
    return blocks.shape[0] * (blocks.shape[1] - 1) / (max(text_bytes, 1) * math.log(2))


@dataclass(frozen=True)
class GateScore:
    """Scores one evaluation of a retrain as the gate will (picklable: it runs in the Ray Train
    workers). ``bits_per_nat`` per set comes from ``bits_per_nat``."""

    policy: GateConfig
    weights: dict[str, float]
    bits_per_nat: dict[str, float]
    margin: float = 0.0

    def __call__(self, losses: dict[str, float], initial: dict[str, float]) -> tuple[float, str]:
        """The score of the model with ``losses`` against the base model (``initial``), as the module's
        docstring says, and a sentence naming the primary rule's gain and the closest rule."""
        metrics = {name: {"candidate": self._metrics(name, loss), "champion": self._metrics(name, initial[name])}
                   for name, loss in losses.items()}
        rules = apply_policy(self.policy, metrics, self.weights)
        primary, closest = rules[0], min(rules, key=lambda rule: rule.margin)  # rules[0]: the gain (a warm start's)
        near = f"closest: {closest.rule} ({closest.reason}, margin {closest.margin:+.2%})"
        if closest.margin >= self.margin:
            return primary.margin, f"every rule passes with ≥ {self.margin:.1%} to spare; gain {primary.reason}; {near}"
        verdict = "fails" if closest.margin < 0 else f"passes with < {self.margin:.1%} to spare"
        return closest.margin - self.margin, f"{verdict}; {near}"

    def _metrics(self, name: str, loss: float) -> SetMetrics:
        # Generation metrics are not measured in training; training_policy asks no rule of them.
        return SetMetrics(perplexity=math.exp(loss), bits_per_byte=loss * self.bits_per_nat[name], bleu=0.0,
                          chrf=0.0, rouge_l=0.0, ms_per_token=0.0, texts=0, tokens=0, prompts=0)
