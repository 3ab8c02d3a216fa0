"""When a node sheds shadow work: a pure state machine with hysteresis (no I/O, `now` passed in).

Four signals, each with a pause threshold and a lower resume threshold:
- shadow queue depth (jobs waiting),
- event-loop lag (the worst probe delay over the last `lag_window_s` seconds),
- event-loop busy share (CPU time of the loop's thread / wall time, over the last
  `lag_window_s` seconds): a saturated loop runs many short callbacks and shows little lag,
  but it is 100 % busy, and every shadow prediction run inline then costs a primary one;
- the primary's p99 latency over a sliding window of `window_s` seconds (judged only once the
  window holds `min_samples` latencies, so a handful of slow requests at start never pauses).

Transitions (the whole table):

    RUNNING --any signal >= its pause threshold-->                           PAUSED  (pauses += 1)
    PAUSED  --every signal <= its resume threshold, and paused >= min_pause_s--> RUNNING

Between the two thresholds nothing changes: that gap is the hysteresis that keeps a node near
its limit from flapping. A threshold of None turns its signal off. Resume thresholds are `resume_ratio` x the pause
threshold, except for the busy share (`busy_resume_ratio`: a node paused at 90 % busy resumes
at 72 %, not at 45 %, which a loaded node might never reach).
"""

from __future__ import annotations

import collections
import enum
import math
from dataclasses import dataclass


class State(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"


@dataclass(frozen=True, slots=True)
class PressureLimits:
    pause_queue: int | None = 800
    pause_lag_ms: float | None = 100.0
    pause_p99_ms: float | None = None
    pause_busy: float | None = 0.9
    resume_ratio: float = 0.5
    busy_resume_ratio: float = 0.8  # resume once every signal is at or below ratio x its pause threshold
    window_s: float = 10.0
    lag_window_s: float = 1.0
    min_samples: int = 20
    min_pause_s: float = 1.0
    max_samples: int = 4096  # latencies kept in the window: bounds memory and the p99's cost

    def __post_init__(self) -> None:
        if not 0.0 < self.resume_ratio <= 1.0:
            raise ValueError(f"resume_ratio {self.resume_ratio}: expected 0 < ratio <= 1")


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of state and the signals that caused it (for the log line and metrics)."""

    state: State
    reason: str
    queue: int
    lag_ms: float
    p99_ms: float | None
    busy: float | None = None


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list (the comparison uses the same rule)."""
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


class Pressure:
    """Feed it observations, call `evaluate(now, queue)` periodically; it says when to pause and resume."""

    def __init__(self, limits: PressureLimits | None = None) -> None:
        self.limits = limits or PressureLimits()
        self.state = State.RUNNING
        self.pauses = 0
        self.paused_since: float | None = None
        self.reason = ""
        self._latencies: collections.deque[tuple[float, float]] = collections.deque(maxlen=self.limits.max_samples)
        self._lags: collections.deque[tuple[float, float]] = collections.deque(maxlen=1024)
        self._busy: float | None = None

    @property
    def paused(self) -> bool:
        return self.state is State.PAUSED

    def observe_latency(self, ms: float, now: float) -> None:
        """One primary prediction's latency."""
        self._latencies.append((now, ms))

    def observe_lag(self, ms: float, now: float) -> None:
        """One event-loop lag probe: how late a timer fired."""
        self._lags.append((now, ms))

    @property
    def busy(self) -> float | None:
        """The last busy share the probe observed (None before the first full window)."""
        return self._busy

    def observe_busy(self, share: float) -> None:
        """The loop thread's busy share over the recent past (computed by the probe)."""
        self._busy = share

    def p99(self, now: float) -> float | None:
        self._expire(self._latencies, now - self.limits.window_s)
        if len(self._latencies) < self.limits.min_samples:
            return None
        return percentile(sorted(ms for _, ms in self._latencies), 99.0)

    def lag(self, now: float) -> float:
        self._expire(self._lags, now - self.limits.lag_window_s)
        return max((ms for _, ms in self._lags), default=0.0)

    @staticmethod
    def _expire(dq: collections.deque[tuple[float, float]], horizon: float) -> None:
        while dq and dq[0][0] < horizon:
            dq.popleft()

    def evaluate(self, now: float, queue: int) -> Transition | None:
        """The transition this moment causes, if any (and apply it)."""
        lim = self.limits
        lag = self.lag(now)
        p99 = self.p99(now) if lim.pause_p99_ms is not None else None
        signals = [("queue", float(queue), lim.pause_queue, lim.resume_ratio),
                   ("loop_lag", lag, lim.pause_lag_ms, lim.resume_ratio),
                   ("primary_p99", p99, lim.pause_p99_ms, lim.resume_ratio),
                   ("loop_busy", self._busy, lim.pause_busy, lim.busy_resume_ratio)]
        if self.state is State.RUNNING:
            over = [name for name, value, limit, _ in signals
                    if limit is not None and value is not None and value >= limit]
            if not over:
                return None
            self.state = State.PAUSED
            self.pauses += 1
            self.paused_since = now
            self.reason = ",".join(over)
            return Transition(State.PAUSED, self.reason, queue, lag, p99, self._busy)
        assert self.paused_since is not None
        if now - self.paused_since < lim.min_pause_s:
            return None
        for _name, value, limit, ratio in signals:
            if limit is not None and value is not None and value > limit * ratio:
                return None
        self.state = State.RUNNING
        self.paused_since = None
        reason, self.reason = self.reason, ""
        return Transition(State.RUNNING, f"pressure fell ({reason})", queue, lag, p99, self._busy)
