"""Errors a serving node answers with: each carries its HTTP status and says what to do.

Every error that reaches a client is JSON `{"error": "<reason>"}` with the status
below; nothing else ever escapes the request path as a 500 without a reason. Every 503
carries `Retry-After` (seconds: `retry_after`, else 1).

    ServingError                    root (500, retriable=False)
    ├── InvalidRequest              400: the body or its tensors are wrong
    │   ├── RequestTooLarge         413: the body is over MODELCD_MAX_REQUEST_BYTES
    │   └── ResponseTooLarge        400: the answer would be over MODELCD_MAX_RESPONSE_BYTES
    ├── ModelNotFound               404: no such model, version or endpoint on this node
    ├── ModelUnavailable            503: known, but not loaded (loading, failed to load, over budget)
    │   ├── ModelLoading            503: deployed here and not loaded yet (retriable)
    │   └── ModelBusy               503: too many of its predictions still running (retriable)
    ├── NodeUnavailable             503: the node cannot take the request now (retriable)
    │   ├── NodeStarting            503: still reading the target state: it cannot yet tell unknown from not loaded
    │   └── NodeOverloaded          503: MODELCD_MAX_INFLIGHT_BYTES of requests are already in flight
    ├── PredictFailed               500: the model raised while predicting
    └── PredictTimeout              504: the model did not answer within the prediction timeout
"""

from __future__ import annotations

from typing import ClassVar


class ServingError(Exception):
    """Root of the serving node's errors."""

    status: ClassVar[int] = 500
    retriable: ClassVar[bool] = False

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after  # seconds a client should wait before retrying (503s)


class InvalidRequest(ServingError):
    status = 400


class RequestTooLarge(InvalidRequest):
    status = 413


class ResponseTooLarge(InvalidRequest):
    status = 400


class ModelNotFound(ServingError):
    status = 404


class ModelUnavailable(ServingError):
    status = 503
    retriable = True


class ModelLoading(ModelUnavailable):
    status = 503
    retriable = True


class NodeUnavailable(ServingError):
    status = 503
    retriable = True


class NodeStarting(NodeUnavailable):
    pass


class NodeOverloaded(NodeUnavailable):
    pass


class ModelBusy(ModelUnavailable):
    status = 503
    retriable = True


class PredictFailed(ServingError):
    status = 500


class PredictTimeout(ServingError):
    status = 504
    retriable = True
