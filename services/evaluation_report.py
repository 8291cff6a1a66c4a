"""The gate's report: what it records (the sets, weights, metrics, rules with their reasons and the
verdict) and the same as one self-contained HTML page (no scripts, no external assets).

People decide on promotions from this page, so it puts the verdict first, then every rule with
its reason, the metrics side by side with deltas, and samples of both models on the same prompts.
"""

from __future__ import annotations

from jinja2 import Environment, select_autoescape
from pydantic import BaseModel, Field

from genloop.training.evaluation import BETTER, SetMetrics


class RuleResult(BaseModel):
    rule: str = Field(description="Human-readable rule, e.g. 'current.bits_per_byte improves ≥ 1%'.")
    passed: bool
    reason: str = Field(description="Why it passed or failed, with the numbers.")
    margin: float = Field(0.0, description="How far past its threshold the value is, as a fraction of the "
                          "threshold's scale (≥ 0 passes): the rules' common unit, so the smallest margin is "
                          "the rule closest to failing.")


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
    weights: dict[str, float] = Field(
        default_factory=dict, description="Set → weight of its gain in 'better on what we serve now'.")
    traffic: str = Field("", description="How the weights were chosen, in a sentence.")
    metrics: dict[str, dict[str, SetMetrics]] = Field(description="set → 'candidate'/'champion' → metrics.")
    rules: list[RuleResult]
    passed: bool
    samples: list[Sample]

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "fail"


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>genloop evaluation {{ r.id }}</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f4f4f4}.pass{color:#0a7a2f;font-weight:bold}.fail{color:#b00020;font-weight:bold}
pre{white-space:pre-wrap;margin:0;font:12px/1.3 ui-monospace,monospace;max-width:28em}
</style></head><body>
<h1>Evaluation {{ r.id }}</h1>
<p>Candidate <b id="candidate">v{{ r.candidate.version }}</b> ({{ r.candidate.dataset }}) against
{% if r.champion %}champion <b id="champion">v{{ r.champion.version }}</b> ({{ r.champion.dataset }}){% else %}
no champion (first model: judged by the absolute bounds alone){% endif %} · {{ r.created_at }}</p>
<p>Verdict: <span id="verdict" class="{{ r.verdict }}">{{ r.verdict | upper }}</span></p>
<p id="traffic">Weights: {% for name, w in r.weights.items() %}{{ name }} {{ '%.0f%%' % (100 * w) }}{{
', ' if not loop.last }}{% endfor %}
· {{ r.traffic }}</p>
<h2>Rules</h2>
<table id="rules"><tr><th>rule</th><th>result</th><th>reason</th></tr>
{% for rule in r.rules %}<tr><td>{{ rule.rule }}</td>
<td class="{{ 'pass' if rule.passed else 'fail' }}">{{ 'pass' if rule.passed else 'fail' }}</td>
<td>{{ rule.reason }}</td></tr>{% endfor %}</table>
<h2>Metrics</h2>
<table id="metrics"><tr><th>set</th><th>metric</th><th>candidate</th><th>champion</th><th>delta</th></tr>
{% for set_name, by_model in r.metrics.items() %}{% for metric in metrics %}
<tr><td>{{ set_name }} ({{ r.sets[set_name] | join(', ') }})</td><td>{{ metric }}</td>
<td>{{ '%.4g' % by_model.candidate[metric] }}</td>
{% if by_model.champion %}<td>{{ '%.4g' % by_model.champion[metric] }}</td>
<td>{{ '%+.4g' % (by_model.candidate[metric] - by_model.champion[metric]) }}</td>
{% else %}<td>–</td><td>–</td>{% endif %}</tr>{% endfor %}{% endfor %}
<tr><td>model</td><td>parameters</td><td>{{ r.candidate.parameters }}</td>
<td>{{ r.champion.parameters if r.champion else '–' }}</td><td></td></tr>
<tr><td>model</td><td>size on disk (bytes)</td><td>{{ r.candidate.size_on_disk_bytes }}</td>
<td>{{ r.champion.size_on_disk_bytes if r.champion else '–' }}</td><td></td></tr>
</table>
<h2>Samples</h2>
<table id="samples"><tr><th>set</th><th>prompt</th><th>reference continuation</th>
<th>champion{% if r.champion %} v{{ r.champion.version }}{% endif %}</th>
<th>candidate v{{ r.candidate.version }}</th></tr>
{% for s in r.samples %}<tr class="sample"><td>{{ s.set }}</td><td><pre>{{ s.prompt }}</pre></td>
<td><pre>{{ s.reference }}</pre></td><td><pre>{{ s.champion if s.champion is not none else '–' }}</pre></td>
<td><pre>{{ s.candidate }}</pre></td></tr>{% endfor %}
</table></body></html>
"""

_environment = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
_template = _environment.from_string(TEMPLATE)


def render_html(report: EvaluationReport) -> str:
    data = report.model_dump(mode="json")
    return _template.render(r={**data, "verdict": report.verdict}, metrics=tuple(BETTER))
