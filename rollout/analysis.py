"""Canary analysis: canary vs baseline over one window of evidence → promote, hold or roll back.

Pure: no I/O, no clock, no randomness; the rollout controller gathers the evidence and calls
`analyze`. Every check turns its figure into a confidence interval (at the plan's confidence)
and compares the interval with a static bound:

- entirely on the good side → PASS; entirely on the bad side → FAIL;
- straddling the bound, or fewer samples than the check's minimum → INCONCLUSIVE.

Verdict: any FAIL → ROLLBACK (with the failing checks as evidence); else any INCONCLUSIVE →
HOLD (never promote on no evidence); else PROMOTE. An inconclusive check says how many samples
(`need`, in its own unit `n`) it would take to decide at the figures seen, so `time_to_verdict`
can tell an operator how long the hold lasts at the current traffic.

Checks:
- model error rate (5xx), canary against baseline: the difference of the two rates with
  Newcombe's hybrid score interval (built from each arm's Wilson interval), against
  `max_error_rate_increase`: traffic that fails equally on both arms never fails a canary;
- client errors (4xx: the callers' mistakes, counted apart by the nodes) are not model errors.
  Their shares are compared the same way, one-sided: a canary that refuses clearly more of the
  same traffic than the baseline (`max_client_error_increase`: an input signature that changed)
  fails; otherwise the check passes, and it never holds a rollout;
- optional ceiling on the canary's model error rate (`max_error_rate` < 1): Wilson interval;
- latency p50 / p99 of the canary: order-statistic interval of the quantile against the bound
  (ranks beyond the sample are clamped to its extremes: with few samples a high quantile's
  upper bound is the largest latency seen);
- prediction divergence, by output kind:
  * classifiers, **paired** samples (the same request answered by both models: shadow
    predictions, or identical inputs seen in both arms): agreement rate = share of rows with
    equal labels, Wilson interval against `min_agreement`;
  * classifiers, **unpaired** (the split sends each request to one model only, so per-request
    agreement does not exist): the two arms are random samples of the same traffic (the split
    hashes a key, independent of the features), so the models should produce the same label
    distribution. We measure the overlap of the two label-frequency vectors,
    Σ_l min(p_l, q_l) = 1 − total-variation distance (the best agreement any pairing of the two
    outputs could reach, so it bounds per-request agreement from above), and bound it with
    per-label Wilson intervals made simultaneous by Bonferroni; against `min_label_overlap`;
  * regressors: two-sample Kolmogorov–Smirnov distance D with its asymptotic p-value; the
    interval is D ± c(α)·√((n+m)/(nm)) (the asymptotic critical value), against
    `max_ks_statistic`; and the shift of the mean in baseline standard deviations, with a
    Welch interval, against `max_mean_shift`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from statistics import NormalDist
from typing import Any

from modelcd.events.schemas import AnalysisThresholds


class Status(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"
    SKIPPED = "skipped"


class Verdict(StrEnum):
    PROMOTE = "promote"
    HOLD = "hold"
    ROLLBACK = "rollback"


# --- statistics ---------------------------------------------------------------------------------


def z_for(confidence: float, tests: int = 1) -> float:
    """Two-sided normal quantile for `confidence`, Bonferroni-adjusted over `tests` intervals."""
    alpha = (1.0 - confidence) / max(tests, 1)
    return NormalDist().inv_cdf(1.0 - alpha / 2.0)


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_interval(x1: int, n1: int, x2: int, n2: int, z: float) -> tuple[float, float, float]:
    """(p1 - p2, low, high): Newcombe's hybrid score interval (method 10) of a difference of proportions."""
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = wilson_interval(x1, n1, z)
    l2, u2 = wilson_interval(x2, n2, z)
    d = p1 - p2
    return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def kolmogorov_sf(x: float) -> float:
    """P(K > x) for the Kolmogorov distribution: 2 Σ (-1)^(k-1) exp(-2 k² x²)."""
    if x <= 0.0:
        return 1.0
    if x < 0.2:  # the alternating series converges slowly there, and the value is 1 to 1e-40
        return 1.0
    total = 0.0
    for k in range(1, 101):
        term = math.exp(-2.0 * k * k * x * x)
        total += term if k % 2 else -term
        if term < 1e-16:
            break
    return min(1.0, max(0.0, 2.0 * total))


def ks_2samp(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Two-sample KS statistic D and its asymptotic p-value (as scipy's `method='asymp'`)."""
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return 0.0, 1.0
    xa, xb = sorted(a), sorted(b)
    i = j = 0
    d = 0.0
    while i < n and j < m:
        x = min(xa[i], xb[j])
        while i < n and xa[i] <= x:  # step over ties in both samples together
            i += 1
        while j < m and xb[j] <= x:
            j += 1
        d = max(d, abs(i / n - j / m))
    en = math.sqrt(n * m / (n + m))
    return d, kolmogorov_sf(en * d)


def ks_critical(n: int, m: int, confidence: float) -> float:
    """Asymptotic critical distance c(α)·√((n+m)/(nm)), c(α) = √(-½ ln(α/2))."""
    alpha = 1.0 - confidence
    return math.sqrt(-0.5 * math.log(alpha / 2.0)) * math.sqrt((n + m) / (n * m))


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default) of an already sorted sample."""
    n = len(sorted_values)
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def quantile_interval(sorted_values: Sequence[float], q: float, z: float) -> tuple[float, float]:
    """Distribution-free interval of the q-quantile from order statistics (normal approx. of the rank)."""
    n = len(sorted_values)
    spread = z * math.sqrt(n * q * (1 - q))
    lo_rank = max(0, math.floor(n * q - spread) - 1)  # 1-based rank → 0-based index
    hi_rank = min(n - 1, math.ceil(n * q + spread) - 1)
    return sorted_values[lo_rank], sorted_values[hi_rank]


# --- evidence -----------------------------------------------------------------------------------


@dataclass
class ArmWindow:
    """What one arm (canary or baseline) did in the window.

    `requests`: calls that reached the model (answered, or failed by the model or its node);
    `errors`: those that failed (5xx); `client_errors`: calls refused as the caller's mistake (4xx),
    not in `requests`. Counts come from usage reports when nodes sent any (complete counts), else
    from the sampled prediction logs; latencies and outputs only from the logs (samples).
    """

    requests: int = 0
    errors: int = 0
    client_errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)  # output values, one per row


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    value: float | None = None
    low: float | None = None
    high: float | None = None
    bound: float | None = None
    n: int = 0
    detail: str = ""
    need: int | None = None  # inconclusive: samples (in the unit of `n`) a verdict would take; None: unknown

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "status": str(self.status), "n": self.n}
        if self.need is not None:
            out["need"] = self.need
        for k in ("value", "low", "high", "bound"):
            v = getattr(self, k)
            if v is not None:
                out[k] = round(v, 6) if math.isfinite(v) else str(v)
        if self.detail:
            out["detail"] = self.detail
        return out


@dataclass(frozen=True)
class Analysis:
    verdict: Verdict
    checks: tuple[Check, ...]
    figures: dict[str, Any]

    @property
    def reason(self) -> str:
        """One line: the failing (or inconclusive) checks, or 'all checks passed'."""
        bad = [c for c in self.checks if c.status is Status.FAIL] or [
            c for c in self.checks if c.status is Status.INCONCLUSIVE]
        if not bad:
            return "all checks passed"
        return "; ".join(f"{c.name} {c.status}: {c.detail}" for c in bad)

    def evidence(self) -> dict[str, Any]:
        return {"verdict": str(self.verdict), "checks": [c.to_dict() for c in self.checks], **self.figures}


def _need(value: float, low: float, high: float, bound: float, n: int) -> int | None:
    """Samples an inconclusive interval would need to clear `bound`, were the figure to stay where it is.

    The interval's half-width on the bound's side shrinks as 1/√n; None when the figure sits on
    the bound (no sample size decides it).
    """
    gap = abs(bound - value)
    half = (high - value) if bound >= value else (value - low)
    if gap <= 1e-12 or n <= 0:
        return None
    return min(10**9, max(n + 1, math.ceil(n * (half / gap) ** 2)))


def _need_scaled(interval_at: Callable[[float], tuple[float, float]], value: float, bound: float,
                 n: int) -> int | None:
    """`_need` for proportions: the smallest n·k whose interval, with the same observed rates
    (`interval_at(k)`: the interval with every count scaled by k), clears `bound`. Wilson-type
    intervals narrow faster than 1/√n near 0 and 1, so this is searched, not extrapolated."""
    if abs(bound - value) <= 1e-12 or n <= 0:
        return None

    def clear(k: float) -> bool:
        lo, hi = interval_at(k)
        return hi <= bound or lo > bound if value <= bound else lo >= bound or hi < bound

    hi_k = 2.0
    while not clear(hi_k):
        hi_k *= 2
        if hi_k > 1e7 / n:
            return None
    lo_k = 1.0
    for _ in range(40):
        mid = (lo_k + hi_k) / 2
        lo_k, hi_k = (lo_k, mid) if clear(mid) else (mid, hi_k)
    return max(n + 1, math.ceil(n * hi_k))


def _bounded(name: str, value: float, low: float, high: float, bound: float, n: int, *,
             upper: bool, unit: str = "", shown: str | None = None, bound_shown: str | None = None) -> Check:
    """A check of an interval against a bound; `upper`: the figure must stay at or below it."""
    shown = shown or f"{value:.4g}{unit} in [{low:.4g}, {high:.4g}]"
    b = bound_shown or f"{bound:g}{unit}"
    if upper:
        if high <= bound:
            return Check(name, Status.PASS, value, low, high, bound, n, f"{shown} <= {b}")
        if low > bound:
            return Check(name, Status.FAIL, value, low, high, bound, n, f"{shown} > {b}")
    else:
        if low >= bound:
            return Check(name, Status.PASS, value, low, high, bound, n, f"{shown} >= {b}")
        if high < bound:
            return Check(name, Status.FAIL, value, low, high, bound, n, f"{shown} < {b}")
    return Check(name, Status.INCONCLUSIVE, value, low, high, bound, n, f"{shown} straddles {b}",
                 need=_need(value, low, high, bound, n))


def _too_few(name: str, n: int, minimum: int, bound: float | None, what: str) -> Check:
    return Check(name, Status.INCONCLUSIVE, None, None, None, bound, n, f"{n} {what}, need {minimum}",
                 need=max(minimum, 1))


def _pts(x: float) -> str:
    return f"{x * 100:+.2f} pts"


def check_error_rate(canary: ArmWindow, baseline: ArmWindow, t: AnalysisThresholds) -> Check:
    """Model errors (5xx), canary against baseline: the interval of the difference against the allowed increase."""
    n = min(canary.requests, baseline.requests)
    if n < max(t.min_requests, 1):
        return _too_few("error_rate", n, t.min_requests, t.max_error_rate_increase, "requests in the smaller arm")
    d, lo, hi = newcombe_interval(canary.errors, canary.requests, baseline.errors, baseline.requests,
                                  z_for(t.confidence))
    shown = (f"canary {canary.errors / canary.requests:.2%} vs baseline {baseline.errors / baseline.requests:.2%}: "
             f"{_pts(d)} in [{_pts(lo)}, {_pts(hi)}]")
    c = _bounded("error_rate", d, lo, hi, t.max_error_rate_increase, n, upper=True, shown=shown,
                 bound_shown=_pts(t.max_error_rate_increase))
    if c.status is Status.INCONCLUSIVE:
        z = z_for(t.confidence)
        pc, pb = canary.errors / canary.requests, baseline.errors / baseline.requests

        def at(k: float) -> tuple[float, float]:
            n1, n2 = max(1, round(canary.requests * k)), max(1, round(baseline.requests * k))
            _d, lo_k, hi_k = newcombe_interval(round(pc * n1), n1, round(pb * n2), n2, z)
            return lo_k, hi_k

        c = replace(c, need=_need_scaled(at, d, t.max_error_rate_increase, n))
    return c


def check_client_errors(canary: ArmWindow, baseline: ArmWindow, t: AnalysisThresholds) -> Check:
    """4xx shares compared one-sided: fail only when the canary clearly refuses more of the same traffic."""
    nc, nb = canary.requests + canary.client_errors, baseline.requests + baseline.client_errors
    if canary.client_errors == 0 and baseline.client_errors == 0:
        return Check("client_errors", Status.SKIPPED, detail="no client errors")
    if min(nc, nb) < max(t.min_requests, 1):
        return Check("client_errors", Status.SKIPPED, n=min(nc, nb),
                     detail=f"{min(nc, nb)} requests in the smaller arm, need {t.min_requests} to compare")
    d, lo, hi = newcombe_interval(canary.client_errors, nc, baseline.client_errors, nb, z_for(t.confidence))
    bound = t.max_client_error_increase
    shown = (f"canary {canary.client_errors / nc:.2%} vs baseline {baseline.client_errors / nb:.2%} refused: "
             f"{_pts(d)} in [{_pts(lo)}, {_pts(hi)}]")
    if lo > bound:
        return Check("client_errors", Status.FAIL, d, lo, hi, bound, min(nc, nb),
                     f"{shown} > {_pts(bound)}: the canary refuses requests the baseline accepts")
    return Check("client_errors", Status.PASS, d, lo, hi, bound, min(nc, nb),
                 f"{shown}, not above {_pts(bound)} (the callers' mistakes, not the model's)")


def check_error_ceiling(arm: ArmWindow, t: AnalysisThresholds) -> Check:
    """The plan's optional absolute ceiling on the canary's model error rate."""
    if t.max_error_rate >= 1.0:
        return Check("error_ceiling", Status.SKIPPED, detail="no ceiling in the plan")
    if arm.requests < max(t.min_requests, 1):
        return _too_few("error_ceiling", arm.requests, t.min_requests, t.max_error_rate, "requests")
    return _proportion("error_ceiling", arm.errors, arm.requests, t.max_error_rate, t, upper=True)


def check_latency(arm: ArmWindow, q: float, bound: float | None, t: AnalysisThresholds) -> Check:
    name = f"latency_p{round(q * 100)}"
    if bound is None:
        return Check(name, Status.SKIPPED, detail="no bound in the plan")
    n = len(arm.latencies_ms)
    if n < max(t.min_latency_samples, 1):
        return _too_few(name, n, t.min_latency_samples, bound, "latency samples")
    xs = sorted(arm.latencies_ms)
    lo, hi = quantile_interval(xs, q, z_for(t.confidence))
    return _bounded(name, quantile(xs, q), lo, hi, bound, n, upper=True, unit="ms")


def check_agreement(pairs: Sequence[tuple[Any, Any]], t: AnalysisThresholds) -> Check:
    n = len(pairs)
    if n < max(t.min_divergence_samples, 1):
        return _too_few("agreement", n, t.min_divergence_samples, t.min_agreement, "paired rows")
    agree = sum(1 for a, b in pairs if _label(a) == _label(b))
    return _proportion("agreement", agree, n, t.min_agreement, t, upper=False)


def _proportion(name: str, k: int, n: int, bound: float, t: AnalysisThresholds, *, upper: bool) -> Check:
    """A Wilson interval of k/n against `bound`; an inconclusive one says how many trials would decide it."""
    z = z_for(t.confidence)
    lo, hi = wilson_interval(k, n, z)
    c = _bounded(name, k / n, lo, hi, bound, n, upper=upper)
    if c.status is Status.INCONCLUSIVE:
        def at(scale: float) -> tuple[float, float]:
            m = max(1, round(n * scale))
            return wilson_interval(round(k / n * m), m, z)

        c = replace(c, need=_need_scaled(at, k / n, bound, n))
    return c


def label_overlap(canary: Sequence[Any], baseline: Sequence[Any], confidence: float) -> tuple[float, float, float]:
    """(overlap, low, high) of two label distributions: Σ min(p_l, q_l), simultaneous Wilson bounds."""
    pc, pb = Counter(map(_label, canary)), Counter(map(_label, baseline))
    labels = set(pc) | set(pb)
    nc, nb = len(canary), len(baseline)
    z = z_for(confidence, tests=2 * len(labels))
    value = low = high = 0.0
    for lab in labels:
        c_lo, c_hi = wilson_interval(pc[lab], nc, z)
        b_lo, b_hi = wilson_interval(pb[lab], nb, z)
        value += min(pc[lab] / nc, pb[lab] / nb)
        low += min(c_lo, b_lo)
        high += min(c_hi, b_hi)
    return value, low, min(1.0, high)


def check_label_overlap(canary: Sequence[Any], baseline: Sequence[Any], t: AnalysisThresholds) -> Check:
    n = min(len(canary), len(baseline))
    if n < max(t.min_divergence_samples, 1):
        return _too_few("label_overlap", n, t.min_divergence_samples, t.min_label_overlap, "rows in the smaller arm")
    value, lo, hi = label_overlap(canary, baseline, t.confidence)
    return _bounded("label_overlap", value, lo, hi, t.min_label_overlap, n, upper=False)


def check_ks(canary: Sequence[float], baseline: Sequence[float], t: AnalysisThresholds) -> Check:
    n = min(len(canary), len(baseline))
    if n < max(t.min_divergence_samples, 1):
        return _too_few("ks_distance", n, t.min_divergence_samples, t.max_ks_statistic, "rows in the smaller arm")
    d, p = ks_2samp(canary, baseline)
    eps = ks_critical(len(canary), len(baseline), t.confidence)
    c = _bounded("ks_distance", d, max(0.0, d - eps), min(1.0, d + eps), t.max_ks_statistic, n, upper=True)
    return Check(c.name, c.status, c.value, c.low, c.high, c.bound, c.n, f"{c.detail}, p={p:.3g}")


def check_mean_shift(canary: Sequence[float], baseline: Sequence[float], t: AnalysisThresholds) -> Check:
    n = min(len(canary), len(baseline))
    if n < max(t.min_divergence_samples, 2):
        return _too_few("mean_shift", n, t.min_divergence_samples, t.max_mean_shift, "rows in the smaller arm")
    mc, vc = _mean_var(canary)
    mb, vb = _mean_var(baseline)
    # Baseline's spread is the yardstick; a constant baseline falls back to the canary's, then to 1.
    scale = math.sqrt(vb) or math.sqrt(vc) or 1.0
    shift = (mc - mb) / scale
    half = z_for(t.confidence) * math.sqrt(vc / len(canary) + vb / len(baseline)) / scale
    lo, hi = shift - half, shift + half
    # |shift| must stay within the bound: pass if the whole interval is inside, fail if entirely outside.
    inner = Check("mean_shift", Status.INCONCLUSIVE, shift, lo, hi, t.max_mean_shift, n)
    shown = f"{shift:+.4g} sd in [{lo:+.4g}, {hi:+.4g}]"
    if -t.max_mean_shift <= lo and hi <= t.max_mean_shift:
        return Check(**{**inner.__dict__, "status": Status.PASS, "detail": f"{shown} within ±{t.max_mean_shift:g}"})
    if lo > t.max_mean_shift or hi < -t.max_mean_shift:
        return Check(**{**inner.__dict__, "status": Status.FAIL, "detail": f"{shown} beyond ±{t.max_mean_shift:g}"})
    return Check(**{**inner.__dict__, "detail": f"{shown} straddles ±{t.max_mean_shift:g}",
                    "need": _need(abs(shift), abs(shift) - half, abs(shift) + half, t.max_mean_shift, n)})


def output_kind(values: Iterable[Any]) -> str:
    """'regressor' if any value is a float, else 'classifier' (ints, strings, bools are labels)."""
    return "regressor" if any(isinstance(v, float) for v in values) else "classifier"


def analyze(canary: ArmWindow, baseline: ArmWindow, thresholds: AnalysisThresholds,
            pairs: Sequence[tuple[Any, Any]] = (), *, window_s: float | None = None) -> Analysis:
    """Judge the canary against the baseline over one window (`window_s` long). See the module docstring."""
    t = thresholds
    checks = [
        check_error_rate(canary, baseline, t),
        check_client_errors(canary, baseline, t),
        check_error_ceiling(canary, t),
        check_latency(canary, 0.5, t.max_latency_p50_ms, t),
        check_latency(canary, 0.99, t.max_latency_p99_ms, t),
    ]
    kind = t.kind
    if kind == "auto":
        kind = output_kind([*canary.outputs[:1000], *baseline.outputs[:1000], *(p[1] for p in pairs[:1000])])
    figures: dict[str, Any] = {"canary": _figures(canary), "baseline": _figures(baseline), "kind": kind}
    if window_s is not None:
        figures["window_s"] = round(window_s, 3)
    if kind == "classifier":
        # Paired evidence answers the question directly; use it once there is enough of it.
        if len(pairs) >= t.min_divergence_samples:
            checks.append(check_agreement(pairs, t))
            figures["divergence_method"] = "paired"
        else:
            checks.append(check_label_overlap(canary.outputs, baseline.outputs, t))
            figures["divergence_method"] = "label_distribution"
            figures["paired_rows"] = len(pairs)
    elif kind == "regressor":
        if len(pairs) >= t.min_divergence_samples:
            c_vals, b_vals = _numbers(p[1] for p in pairs), _numbers(p[0] for p in pairs)
            figures["divergence_method"] = "paired"
        else:
            c_vals, b_vals = _numbers(canary.outputs), _numbers(baseline.outputs)
            figures["divergence_method"] = "distribution"
        checks.append(check_ks(c_vals, b_vals, t))
        checks.append(check_mean_shift(c_vals, b_vals, t))
    statuses = {c.status for c in checks}
    if Status.FAIL in statuses:
        verdict = Verdict.ROLLBACK
    elif Status.INCONCLUSIVE in statuses:
        verdict = Verdict.HOLD
    else:
        verdict = Verdict.PROMOTE
    return Analysis(verdict, tuple(checks), figures)


def time_to_verdict(evidence: Mapping[str, Any]) -> dict[str, Any] | None:
    """How long the inconclusive checks of an analysis need at the traffic it saw, or None if none is.

    Each inconclusive check gathered `n` samples over the window (`window_s`) and needs `need`:
    at the same rate it has its verdict in (need - n) / (n / window_s) seconds. The slowest check
    decides: {"seconds" (None: cannot tell: no samples yet, or a figure on its bound), "check",
    "n", "need", "rate_per_s"}.
    """
    window = evidence.get("window_s")
    rows = []
    for c in evidence.get("checks", []):
        if c.get("status") != "inconclusive":
            continue
        n, need = int(c.get("n") or 0), c.get("need")
        rate = n / window if window and n > 0 else None
        seconds = None if need is None or rate is None else max(0.0, (need - n) / rate)
        rows.append({"check": c["name"], "n": n, "need": need, "rate_per_s": rate, "seconds": seconds})
    if not rows:
        return None
    unknown = [r for r in rows if r["seconds"] is None]
    return unknown[0] if unknown else max(rows, key=lambda r: r["seconds"])


def samples_eta(t: AnalysisThresholds, log_rate: float, canary_rps: float, baseline_rps: float) -> dict[str, Any] | None:
    """Before a step's first analysis: how long its minimum samples take at the arms' request rates.

    Error rates need `min_requests` per arm; divergence needs `min_divergence_samples` logged rows
    per arm (requests × the plan's log rate); latency bounds need `min_latency_samples` logged
    canary rows. The slowest decides, as in `time_to_verdict` (None: nothing to wait for).
    """
    slow = min(canary_rps, baseline_rps)
    rows: list[tuple[str, int, float]] = [("error_rate", t.min_requests, slow)]
    if t.kind != "none":
        rows.append(("divergence", t.min_divergence_samples, slow * log_rate))
    if t.max_latency_p50_ms is not None or t.max_latency_p99_ms is not None:
        rows.append(("latency", t.min_latency_samples, canary_rps * log_rate))
    out = [{"check": name, "n": 0, "need": need, "rate_per_s": rate or None,
            "seconds": need / rate if rate > 0 else None} for name, need, rate in rows]
    unknown = [r for r in out if r["seconds"] is None]
    return unknown[0] if unknown else max(out, key=lambda r: r["seconds"])


# --- helpers ------------------------------------------------------------------------------------


def extract_values(outputs: Mapping[str, Any], name: str | None = None) -> list[Any]:
    """The values (one per row) of one output of a prediction, whatever shape the log holds.

    Accepts `{"label": [..]}`, `{"label": {"data": [..]}}`, and Open Inference Protocol
    responses `{"outputs": [{"name": .., "data": [..]}]}`; picks `name` or the first output.
    """
    if not outputs:
        return []
    entry: Any
    oip = outputs.get("outputs")
    if isinstance(oip, list) and oip and isinstance(oip[0], Mapping):
        entry = next((o for o in oip if o.get("name") == name), oip[0]) if name else oip[0]
    elif name is not None:
        entry = outputs.get(name)
    else:
        entry = next(iter(outputs.values()))
    if isinstance(entry, Mapping):
        entry = entry.get("data", [])
    return list(_flatten(entry))


def _flatten(x: Any) -> Iterable[Any]:
    if isinstance(x, list | tuple):
        for item in x:
            yield from _flatten(item)
    elif x is not None:
        yield x


def _label(x: Any) -> Any:
    # 1 and 1.0 and True are the same label for the purpose of agreement.
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return x


def _numbers(values: Iterable[Any]) -> list[float]:
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out


def _mean_var(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    mean = math.fsum(xs) / n
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return mean, var


def _figures(arm: ArmWindow) -> dict[str, Any]:
    out: dict[str, Any] = {"requests": arm.requests, "errors": arm.errors, "client_errors": arm.client_errors,
                           "error_rate": round(arm.errors / arm.requests, 6) if arm.requests else None,
                           "latency_samples": len(arm.latencies_ms), "rows": len(arm.outputs)}
    if arm.latencies_ms:
        xs = sorted(arm.latencies_ms)
        out["latency_p50_ms"] = round(quantile(xs, 0.5), 3)
        out["latency_p99_ms"] = round(quantile(xs, 0.99), 3)
    nums = [v for v in arm.outputs[:100_000] if isinstance(v, float)]
    if nums:
        out["output_mean"] = round(math.fsum(nums) / len(nums), 6)
    elif arm.outputs:
        counts = Counter(map(_label, arm.outputs)).most_common(10)
        out["labels"] = {str(k): round(v / len(arm.outputs), 4) for k, v in counts}
    return out
