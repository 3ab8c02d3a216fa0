"""When a model whose worker died restarts, and when it is quarantined instead. Pure, no I/O.

A model's worker may die from the model's own code (a native crash, `os._exit`, the memory
limit) or be killed by the front (no answer within the prediction timeout). Each death is
recorded with its time; the model restarts after an exponential backoff (base × 2^(n-1),
capped) where n counts the deaths within the window, and once n reaches the crash limit the
node quarantines it rather than crash-loop. Invariants: `record` returns the deaths within
the window including this one; `total` only grows.
"""

from __future__ import annotations

from collections import deque


class CrashHistory:
    __slots__ = ("_times", "total")

    def __init__(self) -> None:
        self._times: deque[float] = deque()
        self.total = 0

    def record(self, now: float, window: float) -> int:
        """Record a death at `now`; the number of deaths within the last `window` seconds."""
        self.total += 1
        self._times.append(now)
        while self._times and now - self._times[0] > window:
            self._times.popleft()
        return len(self._times)

    def backoff(self, base: float, cap: float) -> float:
        """Seconds to wait before restarting after the latest death."""
        n = max(1, len(self._times))
        return float(min(cap, base * 2 ** (n - 1)))
