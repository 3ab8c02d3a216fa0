"""Merging queued predictions of one model into one call, and splitting its outputs back. Pure.

A worker answers in order and reads every frame already waiting on its channel; the
predictions among them for the same model that can stack (same input names, dtypes and
shapes past the first axis) run as one call on the rows stacked along axis 0. Most of a
small model's cost is per call (input validation, dispatch), not per row, so under
concurrency this is what keeps the worker from being the node's bottleneck.

Invariants: a merge only happens for a model the worker checked at load as row-independent
(its sample rows predicted one by one equal the batch's rows); outputs are split only when
every output's first axis is the total row count; anything else (an error, an output that
is not per row) falls back to one call per request, so a batch never changes an answer's
shape and a bad request's error is its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Arrays = Mapping[str, np.ndarray]
MAX_BATCH_ROWS = 1024


def rows_of(arrays: Arrays) -> int | None:
    """The common first-axis length of a request's inputs; None if it has none or they differ."""
    n = None
    for a in arrays.values():
        if a.ndim == 0:
            return None
        if n is None:
            n = int(a.shape[0])
        elif a.shape[0] != n:
            return None
    return n


def merge(requests: Sequence[Arrays]) -> tuple[dict[str, np.ndarray], list[int]] | None:
    """Stacked inputs and each request's row count, or None when they cannot stack."""
    first = requests[0]
    names = list(first)
    if not names:
        return None
    rows = []
    for r in requests:
        if list(r) != names:
            return None
        n = rows_of(r)
        if n is None:
            return None
        for name in names:
            a, b = r[name], first[name]
            if a.dtype != b.dtype or a.shape[1:] != b.shape[1:] or a.dtype.hasobject:
                return None
        rows.append(n)
    if sum(rows) > MAX_BATCH_ROWS:
        return None
    return {name: np.concatenate([r[name] for r in requests]) for name in names}, rows


def split(outputs: Mapping[str, Any], rows: Sequence[int]) -> list[dict[str, np.ndarray]] | None:
    """Each request's slice of the outputs, or None when an output is not one row per input row."""
    total = sum(rows)
    arrays = {k: np.asarray(v) for k, v in outputs.items()}
    if any(a.ndim == 0 or a.shape[0] != total for a in arrays.values()):
        return None
    out = []
    start = 0
    for n in rows:
        out.append({k: a[start:start + n] for k, a in arrays.items()})
        start += n
    return out
