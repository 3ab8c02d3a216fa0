"""Errors a serving node answers with: each carries its HTTP status and says what to do.

Every error that reaches a client is JSON `{"error": "<reason>"}` with the status
below; nothing else ever escapes the request path as a 500 without a reason.

    ServingError                    root (500, retriable=False)
    ├── InvalidRequest              400: the body or its tensors are wrong
    ├── ModelNotFound               404: no such model, version or endpoint on this node
    ├── ModelUnavailable            503: known, but not loaded (loading, failed to load, over budget)
    │   └── ModelBusy               503: too many of its predictions still running (retriable)
    ├── PredictFailed               500: the model raised while predicting
    └── PredictTimeout              504: the model did not answer within the prediction timeout
"""

from __future__ import annotations

from typing import ClassVar


class ServingError(Exception):
    """Root of the serving node's errors."""

    status: ClassVar[int] = 500
    retriable: ClassVar[bool] = False

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidRequest(ServingError):
    status = 400


class ModelNotFound(ServingError):
    status = 404


class ModelUnavailable(ServingError):
    status = 503
    retriable = True


class ModelBusy(ModelUnavailable):
    status = 503
    retriable = True


class PredictFailed(ServingError):
    status = 500


class PredictTimeout(ServingError):
    status = 504
    retriable = True
