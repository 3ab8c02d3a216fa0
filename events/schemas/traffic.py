"""`modelcd.traffic`: the traffic policy of one endpoint (a state topic, last write wins).

An endpoint is a named group of models: a weighted split (sticky per request key),
plus shadow relations with a time window, a sampling rate and request criteria.
Rollout controller events travel on the same topic, keyed by endpoint, so a
controller's state is rebuilt by reading it back.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from .base import Doc, Event, now

TOPIC = "modelcd.traffic"


class Route(msgspec.Struct, frozen=True, kw_only=True):
    """One model version of an endpoint and its share of the traffic."""

    model: Annotated[str, Doc("Model name.")]
    version: Annotated[str, Doc("Model version.")]
    weight: Annotated[float, Doc("Share of the endpoint's traffic, in percent; the routes of a policy add up to 100.")]
    # Share of this route's requests logged to modelcd.predictions; None: the node's default
    # (MODELCD_PREDICTION_LOG_RATE). A rollout raises it so its analysis has samples to compare.
    log_rate: Annotated[
        float | None,
        Doc("Share (0..1) of this route's requests logged to modelcd.predictions; null: the node's default "
            "(MODELCD_PREDICTION_LOG_RATE)."),
    ] = None


class Criterion(msgspec.Struct, frozen=True, kw_only=True):
    """A condition on the request: `field` is `header:<name>`, `param:<name>` or `input:<name>`."""

    field: Annotated[
        str,
        Doc("What to test: `header:<name>`, `param:<name>` (request parameter) or `input:<name>` (first value of an "
            "input tensor)."),
    ]
    op: Annotated[
        Literal["eq", "ne", "in", "gt", "ge", "lt", "le", "exists"],
        Doc("Comparison: eq, ne, in (value is a list), gt, ge, lt, le, exists."),
    ] = "eq"
    value: Annotated[Any, Doc("Value compared with (a list for `in`; ignored by `exists`).")] = None


class ShadowRelation(msgspec.Struct, frozen=True, kw_only=True):
    """A shadow: `shadow` predicts on a sample of `primary`'s requests between `start` and `end`."""

    primary: Annotated[str, Doc("Model whose requests are shadowed: a name (any version) or `name:version`.")]
    shadow: Annotated[str, Doc("Model that predicts in the shadow, `name:version`.")]
    start: Annotated[
        float,
        Doc("When shadowing starts, seconds since the Unix epoch (UTC, fractional) (0: now)."),
    ] = 0.0
    end: Annotated[
        float | None,
        Doc("When shadowing stops, seconds since the Unix epoch (UTC, fractional) (null: never)."),
    ] = None
    sample_rate: Annotated[float, Doc("Share (0..1) of the matching requests shadowed.")] = 1.0
    criteria: Annotated[list[Criterion], Doc("Conditions a request must meet to be shadowed (all of them).")] = []


class TrafficPolicy(Event, frozen=True, kw_only=True, tag="modelcd.traffic.policy.v1"):
    """An endpoint's traffic: a weighted split among model versions and its shadow relations."""

    topic = TOPIC
    endpoint: Annotated[str, Doc("Endpoint name (called as `/v2/models/{endpoint}/infer`); also the record key.")]
    routes: Annotated[list[Route], Doc("Weighted split of the endpoint's traffic among model versions.")] = []
    sticky_key: Annotated[
        str | None,
        Doc("Header (or request parameter) whose value pins a caller to one route; null: no stickiness."),
    ] = "x-modelcd-key"
    shadows: Annotated[list[ShadowRelation], Doc("Shadow relations of the endpoint.")] = []
    revision: Annotated[int, Doc("Revision of the policy, incremented on each change (optimistic concurrency).")] = 0
    reason: Annotated[str, Doc("Why it changed, in words.")] = ""
    deleted: Annotated[bool, Doc("true: the endpoint was deleted.")] = False
    at: Annotated[
        float,
        Doc("When it changed, seconds since the Unix epoch (UTC, fractional)."),
    ] = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.endpoint


class AnalysisThresholds(msgspec.Struct, frozen=True, kw_only=True):
    """The canary analysis' static bounds and minimum sample counts (Flagger-style, plus divergence).

    Every check compares a confidence interval (at `confidence`) with its bound: entirely on the
    good side passes, entirely on the bad side fails, straddling is inconclusive.
    """

    confidence: Annotated[
        float,
        Doc("Confidence level (0..1) of the intervals each check compares with its bound."),
    ] = 0.95
    min_requests: Annotated[
        int,
        Doc("Requests per arm (usage reports, else logs) needed before error rates are judged."),
    ] = 50
    max_error_rate: Annotated[
        float,
        Doc("Absolute ceiling (0..1) on the canary's model error rate (5xx), whatever the baseline's; 1: none."),
    ] = 1.0
    max_error_rate_increase: Annotated[
        float,
        Doc("Model errors (5xx) are judged canary against baseline: the canary fails when its rate is above the "
            "baseline's by more than this (0..1; the interval of the difference entirely above)."),
    ] = 0.02
    max_client_error_increase: Annotated[
        float,
        Doc("Client errors (4xx) are the callers' mistakes: only a canary refusing clearly more of the same traffic "
            "than the baseline by more than this (0..1) fails; never a reason to hold."),
    ] = 0.05
    min_latency_samples: Annotated[int, Doc("Canary latency samples needed before latency is judged.")] = 50
    max_latency_p50_ms: Annotated[
        float | None,
        Doc("Largest canary median latency that passes, in milliseconds (null: not checked)."),
    ] = None
    max_latency_p99_ms: Annotated[
        float | None,
        Doc("Largest canary p99 latency that passes, in milliseconds (null: not checked)."),
    ] = None
    min_divergence_samples: Annotated[
        int,
        Doc("Output values (rows) per arm, or pairs, needed before divergence is judged."),
    ] = 200
    kind: Annotated[
        Literal["auto", "classifier", "regressor", "none"],
        Doc("How outputs are compared: auto, classifier, regressor, or none (no divergence check)."),
    ] = "auto"
    output: Annotated[str | None, Doc("Which output tensor to compare (null: the first one).")] = None
    min_agreement: Annotated[
        float,
        Doc("Classifiers, paired samples: smallest share (0..1) of rows where both models agree."),
    ] = 0.9
    min_label_overlap: Annotated[
        float,
        Doc("Classifiers, unpaired: smallest overlap (0..1) of the two label distributions."),
    ] = 0.85
    max_ks_statistic: Annotated[float, Doc("Regressors: largest two-sample Kolmogorov-Smirnov distance (0..1).")] = 0.2
    max_mean_shift: Annotated[
        float,
        Doc("Regressors: largest |mean(canary) - mean(baseline)|, in baseline standard deviations."),
    ] = 0.5


class RolloutPlan(msgspec.Struct, frozen=True, kw_only=True):
    """How a rollout proceeds: canary weights in percent, seconds between analyses, bounds."""

    name: Annotated[str, Doc("Plan name (standard, fast, blue-green, or custom).")] = "standard"
    steps: Annotated[
        list[float],
        Doc("Canary weights in percent, in order, e.g. [1, 10, 50, 100]."),
    ] = msgspec.field(default_factory=lambda: [1.0, 10.0, 50.0, 100.0])
    interval_s: Annotated[float, Doc("Seconds between an analysis and the next step.")] = 600.0
    shadow_first: Annotated[bool, Doc("Blue-green: the canary shadows the baseline (weight 0) until analysed.")] = False
    thresholds: Annotated[AnalysisThresholds, Doc("The analysis' bounds.")] = AnalysisThresholds()
    log_rate: Annotated[float, Doc("Share (0..1) of canary and baseline requests logged while the rollout runs.")] = 0.1
    max_hold_s: Annotated[
        float,
        Doc("Longest a step may hold without a verdict (too few samples, figures straddling a bound), in seconds; "
            "then the rollout is aborted with its evidence and the baseline gets its traffic back."),
    ] = 3600.0


class RolloutStep(Event, frozen=True, kw_only=True, tag="modelcd.rollout.step.v1"):
    """A rollout controller's decision (a fact), or an operator's command to it.

    Facts (`command=False`) are written only by the controller; folding them in order rebuilds
    every rollout. Commands (`command=True`, from the CLI or API) ask for start / pause / resume /
    abort / promote (promote-now: straight to 100 %); the controller answers each with a fact
    carrying the same `command_id`, so a command is applied once even across restarts.
    """

    topic = TOPIC
    endpoint: Annotated[str, Doc("Endpoint the rollout drives; also the record key.")]
    rollout_id: Annotated[str, Doc("Id of the rollout.")]
    action: Annotated[
        Literal["start", "promote", "hold", "rollback", "pause", "resume", "abort", "complete"],
        Doc("start, promote, hold, rollback, pause, resume, abort or complete."),
    ]
    step: Annotated[int, Doc("Index of the current step in the plan's steps.")] = 0
    weight: Annotated[float, Doc("Canary weight after this action, in percent.")] = 0.0
    canary: Annotated[str, Doc("Canary as `name:version`.")] = ""
    baseline: Annotated[str, Doc("Baseline as `name:version`.")] = ""
    evidence: Annotated[dict[str, Any], Doc("The analysis behind a decision (checks, samples, intervals).")] = {}
    reason: Annotated[str, Doc("Why, in words.")] = ""
    at: Annotated[
        float,
        Doc("When, seconds since the Unix epoch (UTC, fractional)."),
    ] = msgspec.field(default_factory=now)
    plan: Annotated[RolloutPlan | None, Doc("The plan (on start).")] = None
    baseline_routes: Annotated[list[Route], Doc("On start: the routes restored on rollback or abort.")] = []
    command: Annotated[
        bool,
        Doc("true: an operator's command to the controller; false: the controller's decision (a fact)."),
    ] = False
    command_id: Annotated[str, Doc("Id of the command; the controller's answer carries the same id.")] = ""

    def key(self) -> str:
        return self.endpoint


TrafficEvent = TrafficPolicy | RolloutStep
