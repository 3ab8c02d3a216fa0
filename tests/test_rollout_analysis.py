"""Canary analysis, pure: the statistics against known values, and each verdict from its evidence."""

from __future__ import annotations

import math
import random

import pytest

from modelcd.events.schemas import AnalysisThresholds
from modelcd.rollout.analysis import (
    ArmWindow,
    Status,
    Verdict,
    analyze,
    extract_values,
    kolmogorov_sf,
    ks_2samp,
    label_overlap,
    quantile,
    quantile_interval,
    wilson_interval,
)

T = AnalysisThresholds(min_requests=50, min_latency_samples=50, min_divergence_samples=200,
                       max_latency_p50_ms=50.0, max_latency_p99_ms=200.0)


def arm(n: int, *, errors: int = 0, latency: float = 10.0, labels: list[int] | None = None,
        values: list[float] | None = None) -> ArmWindow:
    return ArmWindow(requests=n, errors=errors, latencies_ms=[latency] * (n - errors),
                     outputs=list(labels if labels is not None else values if values is not None else []))


def labels(n: int, probs: tuple[float, ...], seed: int) -> list[int]:
    rng = random.Random(seed)
    return rng.choices(range(len(probs)), weights=probs, k=n)


# Reference values computed with scipy 1.17: binomtest(k, n).proportion_ci(method="wilson") and
# kstwobign.sf(sqrt(n*m/(n+m)) * D) (the Kolmogorov limit: the classic asymptotic two-sample p-value).

@pytest.mark.parametrize("k,n,low,high", [
    (81, 263, 0.2552885198782742, 0.36620957698280004),
    (0, 10, 0.0, 0.27753279986288926),
    (50, 100, 0.4038315303659956, 0.5961684696340044),
    (95, 100, 0.8882495307680809, 0.978456320845632),
])
def test_wilson_interval_matches_known_values(k: int, n: int, low: float, high: float) -> None:
    """The Wilson score interval equals scipy's at 95 %."""
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-9) and hi == pytest.approx(high, abs=1e-9)


def test_wilson_interval_without_samples_is_everything() -> None:
    """No trials: the interval is [0, 1], so no check can pass on it."""
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("x,p", [(0.5, 0.963945244), (1.0, 0.269999672), (1.3581, 0.0499996304),
                                 (1.63, 0.00984636489), (2.0, 0.000670925256)])
def test_kolmogorov_survival_function(x: float, p: float) -> None:
    """The Kolmogorov distribution's tail equals scipy's kstwobign.sf."""
    assert kolmogorov_sf(x) == pytest.approx(p, rel=1e-6)


@pytest.mark.parametrize("a,b,d,p", [
    ([0.61, 0.29, 0.06, 0.59, -1.73, -0.74, 0.51, -0.56, 0.39, 1.64, 0.05, -0.06, 0.64, -0.82, 0.37, 1.77, 1.09,
      -1.28, 2.36, 1.31, 1.05, -0.32, -0.4, 1.06, -2.47],
     [2.2, 1.66, 1.38, 0.2, 0.36, 0.0, 0.96, 1.56, 0.44, 1.5, -0.3, 0.66, 2.31, 3.29, -0.27, -0.37, 0.38, 0.7,
      0.19, -0.41, -0.61, 1.17, 0.39, 1.2], 0.22, 0.5938958472891988),
    ([1, 2, 2, 3, 3, 3], [2, 3, 3, 4, 4, 5, 5], 0.5714285714285714, 0.24207030109067038),  # ties across samples
    ([0.1 * i for i in range(300)], [0.1 * i + 3 for i in range(200)], 0.23333333333333328, 4.229107897406324e-06),
])
def test_ks_two_sample_matches_known_values(a: list[float], b: list[float], d: float, p: float) -> None:
    """D and the asymptotic p-value equal scipy's (D from ks_2samp, p from the Kolmogorov limit)."""
    got_d, got_p = ks_2samp(a, b)
    assert got_d == pytest.approx(d, abs=1e-12) and got_p == pytest.approx(p, rel=1e-6)


def test_quantile_and_its_interval() -> None:
    """Quantiles interpolate like numpy; the order-statistic interval brackets the estimate."""
    xs = [float(i) for i in range(1, 101)]
    assert quantile(xs, 0.5) == 50.5 and quantile(xs, 0.99) == pytest.approx(99.01)
    lo, hi = quantile_interval(xs, 0.5, 1.96)
    assert lo < 50.5 < hi and (lo, hi) == (40.0, 60.0)
    assert quantile_interval(xs[:10], 0.99, 1.96)[1] == 10.0  # clamped to the largest observation


def test_label_overlap_is_one_minus_total_variation() -> None:
    """Overlap of [.5,.5] and [.8,.2] label frequencies is 0.7, and its bounds bracket it."""
    value, lo, hi = label_overlap([0] * 50 + [1] * 50, [0] * 80 + [1] * 20, 0.95)
    assert value == pytest.approx(0.7) and lo < 0.7 < hi


def test_extract_values_accepts_the_shapes_nodes_log() -> None:
    """Plain lists, {"data": ...} tensors and OIP response bodies give the same values."""
    assert extract_values({"label": [[1], [2]]}) == [1, 2]
    assert extract_values({"label": {"data": [1, 2]}, "proba": [0.1]}) == [1, 2]
    assert extract_values({"outputs": [{"name": "p", "data": [0.3]}, {"name": "label", "data": [1, 2]}]},
                          "label") == [1, 2]
    assert extract_values({}) == []


def test_too_few_samples_is_inconclusive() -> None:
    """With fewer requests than the minimum nothing is judged: hold, never promote."""
    a = analyze(arm(10, labels=[0] * 10), arm(10, labels=[0] * 10), T)
    assert a.verdict is Verdict.HOLD
    assert {c.name: c.status for c in a.checks}["error_rate"] is Status.INCONCLUSIVE
    assert "need 50" in a.reason


def test_no_evidence_at_all_holds() -> None:
    """An empty window holds (a silent canary is not a healthy one)."""
    assert analyze(ArmWindow(), ArmWindow(), T).verdict is Verdict.HOLD


def test_error_rate_straddling_the_bound_is_inconclusive() -> None:
    """3 % of 100 against the baseline's 2 % of 1000: +1 pt, its interval straddles the allowed +2 pts."""
    a = analyze(arm(100, errors=3, labels=[0] * 1000), arm(1000, errors=20, labels=[0] * 1000), T)
    check = next(c for c in a.checks if c.name == "error_rate")
    assert check.status is Status.INCONCLUSIVE and check.low < 0.02 < check.high
    assert check.value == pytest.approx(0.01) and check.need is not None and check.need > 100
    assert a.verdict is Verdict.HOLD


def test_erroring_canary_rolls_back_with_evidence() -> None:
    """30 % errors against a clean baseline: rollback, and the evidence names the check and its figures."""
    a = analyze(arm(200, errors=60, labels=[0] * 300), arm(1000, labels=[0] * 1000), T)
    assert a.verdict is Verdict.ROLLBACK
    ev = a.evidence()
    failed = [c for c in ev["checks"] if c["status"] == "fail"]
    assert failed[0]["name"] == "error_rate" and failed[0]["low"] > 0.02
    assert "canary 30.00% vs baseline 0.00%" in failed[0]["detail"]
    assert ev["canary"]["errors"] == 60 and "error_rate fail" in a.reason


def test_slow_canary_rolls_back_on_latency() -> None:
    """A canary whose median is 80 ms fails the 50 ms p50 bound."""
    a = analyze(arm(300, latency=80.0, labels=[0] * 300), arm(1000, labels=[0] * 1000), T)
    assert {c.name: c.status for c in a.checks}["latency_p50"] is Status.FAIL
    assert a.verdict is Verdict.ROLLBACK


def test_healthy_classifier_promotes() -> None:
    """Same label distribution, no errors, fast: every check passes and the verdict is promote."""
    base = labels(3000, (0.5, 0.3, 0.2), seed=1)
    can = labels(3000, (0.5, 0.3, 0.2), seed=2)
    a = analyze(arm(3000, labels=can), arm(3000, labels=base), T)
    assert a.verdict is Verdict.PROMOTE, a.reason
    assert a.figures["divergence_method"] == "label_distribution"


def test_diverging_classifier_rolls_back() -> None:
    """A canary that predicts class 0 far more often fails the label-overlap check."""
    base = labels(3000, (0.5, 0.3, 0.2), seed=1)
    can = labels(3000, (0.95, 0.03, 0.02), seed=2)
    a = analyze(arm(3000, labels=can), arm(3000, labels=base), T)
    assert a.verdict is Verdict.ROLLBACK
    assert {c.name: c.status for c in a.checks}["label_overlap"] is Status.FAIL


def test_paired_samples_use_the_agreement_rate() -> None:
    """With enough paired rows, agreement is measured per row: 70 % agreement fails a 90 % bound."""
    rng = random.Random(3)
    pairs = [(0, 0) if rng.random() < 0.7 else (0, 1) for _ in range(500)]
    a = analyze(arm(500, labels=[p[1] for p in pairs]), arm(500, labels=[0] * 500), T, pairs=pairs)
    check = next(c for c in a.checks if c.name == "agreement")
    assert a.figures["divergence_method"] == "paired"
    assert check.status is Status.FAIL and check.value == pytest.approx(0.7, abs=0.05)


def test_paired_agreement_straddling_is_inconclusive() -> None:
    """Agreement 0.9 measured on 300 pairs straddles a 0.9 bound: hold."""
    pairs = [(1, 1)] * 270 + [(1, 2)] * 30
    a = analyze(arm(300, labels=[1] * 300), arm(300, labels=[1] * 300), T, pairs=pairs)
    assert next(c for c in a.checks if c.name == "agreement").status is Status.INCONCLUSIVE
    assert a.verdict is Verdict.HOLD


def test_healthy_regressor_promotes_and_shifted_one_rolls_back() -> None:
    """Regressors: same distribution passes KS and mean shift; a shift of one sd fails both."""
    rng = random.Random(4)
    base = [rng.gauss(10.0, 2.0) for _ in range(2000)]
    same = [rng.gauss(10.0, 2.0) for _ in range(2000)]
    shifted = [rng.gauss(12.0, 2.0) for _ in range(2000)]
    ok = analyze(arm(2000, values=same), arm(2000, values=base), T)
    assert ok.verdict is Verdict.PROMOTE, ok.reason
    assert ok.figures["kind"] == "regressor"
    bad = analyze(arm(2000, values=shifted), arm(2000, values=base), T)
    status = {c.name: c.status for c in bad.checks}
    assert status["ks_distance"] is Status.FAIL and status["mean_shift"] is Status.FAIL
    assert bad.verdict is Verdict.ROLLBACK
    assert math.isclose(bad.figures["canary"]["output_mean"] - bad.figures["baseline"]["output_mean"], 2.0,
                        abs_tol=0.3)
