"""`modelcd.traffic`: the traffic policy of one endpoint (a state topic, last write wins).

An endpoint is a named group of models: a weighted split (sticky per request key),
plus shadow relations with a time window, a sampling rate and request criteria.
Rollout controller events travel on the same topic, keyed by endpoint, so a
controller's state is rebuilt by reading it back.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from .base import Event, now

TOPIC = "modelcd.traffic"


class Route(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    version: str
    weight: float  # share in percent; the routes of a policy add up to 100
    # Share of this route's requests logged to modelcd.predictions; None: the node's default
    # (MODELCD_PREDICTION_LOG_RATE). A rollout raises it so its analysis has samples to compare.
    log_rate: float | None = None


class Criterion(msgspec.Struct, frozen=True, kw_only=True):
    """A condition on the request: `field` is `header:<name>`, `param:<name>` or `input:<name>`."""

    field: str
    op: Literal["eq", "ne", "in", "gt", "ge", "lt", "le", "exists"] = "eq"
    value: Any = None


class ShadowRelation(msgspec.Struct, frozen=True, kw_only=True):
    primary: str  # model name (any version) or name:version
    shadow: str  # name:version
    start: float = 0.0
    end: float | None = None
    sample_rate: float = 1.0
    criteria: list[Criterion] = []


class TrafficPolicy(Event, frozen=True, kw_only=True, tag="modelcd.traffic.policy.v1"):
    topic = TOPIC
    endpoint: str
    routes: list[Route] = []
    sticky_key: str | None = "x-modelcd-key"  # header (or parameter) whose value pins a caller to a model
    shadows: list[ShadowRelation] = []
    revision: int = 0
    reason: str = ""
    deleted: bool = False
    at: float = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.endpoint


class AnalysisThresholds(msgspec.Struct, frozen=True, kw_only=True):
    """The canary analysis' static bounds and minimum sample counts (Flagger-style, plus divergence).

    Every check compares a confidence interval (at `confidence`) with its bound: entirely on the
    good side passes, entirely on the bad side fails, straddling is inconclusive.
    """

    confidence: float = 0.95
    min_requests: int = 50  # canary requests (usage reports, else logs) before the error rate is judged
    max_error_rate: float = 0.05
    min_latency_samples: int = 50
    max_latency_p50_ms: float | None = None
    max_latency_p99_ms: float | None = None
    min_divergence_samples: int = 200  # output values (rows) per arm, or pairs
    kind: Literal["auto", "classifier", "regressor", "none"] = "auto"  # "none": no divergence check
    output: str | None = None  # which output to compare; None: the first one
    min_agreement: float = 0.9  # classifiers, paired samples: share of rows where both models agree
    min_label_overlap: float = 0.85  # classifiers, unpaired: overlap of the two label distributions
    max_ks_statistic: float = 0.2  # regressors: two-sample KS distance
    max_mean_shift: float = 0.5  # regressors: |mean(canary) - mean(baseline)| in baseline standard deviations


class RolloutPlan(msgspec.Struct, frozen=True, kw_only=True):
    """How a rollout proceeds: canary weights in percent, seconds between analyses, bounds."""

    name: str = "standard"
    steps: list[float] = msgspec.field(default_factory=lambda: [1.0, 10.0, 50.0, 100.0])
    interval_s: float = 600.0
    shadow_first: bool = False  # blue-green: the canary shadows the baseline (weight 0) until analysed
    thresholds: AnalysisThresholds = AnalysisThresholds()
    log_rate: float = 0.1  # share of canary and baseline requests logged while the rollout runs


class RolloutStep(Event, frozen=True, kw_only=True, tag="modelcd.rollout.step.v1"):
    """A rollout controller's decision (a fact), or an operator's command to it.

    Facts (`command=False`) are written only by the controller; folding them in order rebuilds
    every rollout. Commands (`command=True`, from the CLI or API) ask for start / pause / resume /
    abort / promote (promote-now: straight to 100 %); the controller answers each with a fact
    carrying the same `command_id`, so a command is applied once even across restarts.
    """

    topic = TOPIC
    endpoint: str
    rollout_id: str
    action: Literal["start", "promote", "hold", "rollback", "pause", "resume", "abort", "complete"]
    step: int = 0
    weight: float = 0.0
    canary: str = ""
    baseline: str = ""
    evidence: dict[str, Any] = {}
    reason: str = ""
    at: float = msgspec.field(default_factory=now)
    plan: RolloutPlan | None = None  # on start
    baseline_routes: list[Route] = []  # on start: the routes to restore on rollback / abort
    command: bool = False
    command_id: str = ""

    def key(self) -> str:
        return self.endpoint


TrafficEvent = TrafficPolicy | RolloutStep
