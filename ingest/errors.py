"""Ingest's errors: what can go wrong with a deployment or an API request, and whose fault it is.

    IngestError                   root; `retriable` says whether the same call may succeed later
    ├── DeploymentRejected        the request or its package is bad: the deployment fails with
    │   │                         `reason` at `step`, nothing is retried and nothing is kept
    │   ├── PackageUnavailable    the package URI cannot be fetched (missing file, key, bucket)
    │   ├── ValidationFailed      artifact validation: a manifest item, checksum or limit
    │   ├── VersionConflict       name:version already serves a different package (immutable)
    │   ├── CompileFailed         the package cannot be compiled (the original runtime is kept
    │   │                         on a conversion failure, so this is rare)
    │   ├── ServingValidationFailed  the sandbox refused it: load error, wrong outputs, crash,
    │   │                         time or memory limit
    │   ├── UnknownModel          a retire request names a model:version that is not in the store
    │   └── ModelInUse            a retire refused by the store's safety check (an endpoint, a
    │                             rollout or a shadow still uses the model; `force` overrides)
    └── ApiError                  an HTTP request the API refuses: `status` (4xx) and `reason`

Transient failures of the store (`StoreUnavailable`) or the broker are not ingest errors:
the pipeline runs the request again with backoff, and past MODELCD_DEPLOY_RETRY_TIME ends
the deployment failed with the last error as its reason.
"""

from __future__ import annotations

from typing import ClassVar

from modelcd.events.schemas.deployments import Step


class IngestError(Exception):
    """Root of ingest's errors."""

    retriable: ClassVar[bool] = False


class DeploymentRejected(IngestError):
    """The deployment fails at `step` because of its input; `reason` is shown to the user."""

    step: Step = "validate"

    def __init__(self, reason: str, *, step: Step | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if step is not None:
            self.step = step


class PackageUnavailable(DeploymentRejected):
    step: Step = "validate"


class ValidationFailed(DeploymentRejected):
    step: Step = "validate"


class VersionConflict(DeploymentRejected):
    step: Step = "validate"


class CompileFailed(DeploymentRejected):
    step: Step = "compile"


class ServingValidationFailed(DeploymentRejected):
    step: Step = "serving-validation"


class UnknownModel(DeploymentRejected):
    step: Step = "retire"


class ModelInUse(DeploymentRejected):
    """A retire refused by the store's safety check: an endpoint, rollout or shadow still uses the model."""

    step: Step = "retire"


class ApiError(IngestError):
    """An HTTP request refused with `status` and a JSON `{"error": reason}` body."""

    def __init__(self, status: int, reason: str, *, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or []

    @classmethod
    def allow(cls, method: str, *allowed: str) -> None:
        """Refuse (405, with the Allow header) a method the route does not take."""
        if method not in allowed:
            raise cls(405, f"method {method} not allowed here; use {', '.join(allowed)}",
                      headers=[(b"allow", ", ".join(allowed).encode())])
