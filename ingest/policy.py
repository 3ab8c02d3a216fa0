"""Ingest's decisions, sans I/O: where a package comes from, whether a request deploys, resumes,
is a no-op or conflicts, and the events and records a deployment ends with.

Nothing here awaits, reads a clock (`now` is passed in) or touches the store; the pipeline
(`pipeline.py`) is the shell that fetches, calls these, and writes.

Invariants:
- versions are immutable: a name:version holds one package for life; another sha256 under the
  same name:version is a conflict, whatever the target (serving or retired);
- a deployment is complete exactly when its record `deployments/<id>.json` exists; a request
  whose record exists is never processed again;
- a request whose own deployment already reached the target state (a crash after the target
  put) resumes: ModelState is published again and the deployment completes, no new package.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

import msgspec

from modelcd.events.schemas import DeployRequested, ModelState, Resources, RetireRequested
from modelcd.store.package import MAX_EXPIRY_SECONDS, Manifest, Package

# The keys live with the store's other layouts (gc reads them too); re-exported for ingest.
from modelcd.store.targets import RECORD_PREFIX, UPLOAD_PREFIX, record_key, request_key, upload_key  # noqa: F401

from .errors import CompileFailed, ValidationFailed



# --- package locations --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PackageSource:
    """A parsed `package_uri`: a store key, a local file, or an S3 object."""

    scheme: Literal["store", "file", "s3"]
    location: str  # store key, absolute path, or object key
    bucket: str = ""


def parse_package_uri(uri: str) -> PackageSource:
    """`store:<key>`, `file:///abs/path.tar` or `s3://bucket/key`; `ValueError` saying what is wrong."""
    if uri.startswith("store:"):
        key = uri.removeprefix("store:")
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"package_uri {uri!r}: a store key is relative, e.g. store:packages/ab/ab12...tar")
        return PackageSource("store", key)
    parts = urlsplit(uri)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(f"package_uri {uri!r}: file URIs are absolute and local, e.g. file:///data/model.tar")
        return PackageSource("file", unquote(parts.path))
    if parts.scheme == "s3":
        key = unquote(parts.path).lstrip("/")
        if not parts.netloc or not key:
            raise ValueError(f"package_uri {uri!r}: expected s3://bucket/key")
        return PackageSource("s3", key, bucket=parts.netloc)
    raise ValueError(f"package_uri {uri!r}: unsupported; use store:<key>, file:///abs/path.tar or s3://bucket/key")


#: Virtual filesystems: their "files" are processes, kernel state and devices, never a package archive.
VIRTUAL_ROOTS = ("/proc", "/sys", "/dev")


def is_under(path: str, directory: str) -> bool:
    """`path` is `directory` or inside it, lexically (both normalized; no filesystem access)."""
    p, d = posixpath.normpath(path), posixpath.normpath(directory)
    return p == d or p.startswith(d.rstrip("/") + "/")


def parse_file_dirs(value: str | None) -> tuple[str, ...]:
    """MODELCD_FILE_URI_DIRS ("/a:/b") as normalized absolute directories; relative entries are ignored."""
    return tuple(posixpath.normpath(d) for d in (value or "").split(":") if d.startswith("/"))


def check_api_file_uri(source: PackageSource, allowed_dirs: tuple[str, ...]) -> None:
    """Through the HTTP door a file:// URI must lie under an allowed directory (lexically here; the pipeline
    checks again after resolving links). One message whatever the path, so nothing about the host leaks."""
    if source.scheme == "file" and not any(is_under(source.location, d) for d in allowed_dirs):
        raise ValueError("file:// package URIs are accepted through the deployment API only under the directories "
                         "MODELCD_FILE_URI_DIRS lists" + ("" if allowed_dirs else " (none: unset)")
                         + "; upload the archive instead, or use s3://")


def check_expiry(seconds: int | None) -> None:
    """A requested expiry is positive and at most `MAX_EXPIRY_SECONDS` (100 years); `ValueError` otherwise."""
    if seconds is None:
        return
    if seconds <= 0:
        raise ValueError("expiry_seconds must be a positive number of seconds")
    if seconds > MAX_EXPIRY_SECONDS:
        raise ValueError(f"expiry_seconds {seconds} is longer than the longest expiry of 100 years "
                         f"({MAX_EXPIRY_SECONDS} s)")


# --- artifact validation beyond the package format ----------------------------------------------


def check_serving_needs(manifest: Manifest) -> None:
    """What serving and monitoring need that the package format leaves optional.

    The format itself (`read_package`) already requires name, version, flavor, signature
    inputs, owner, a positive expiry, sample inputs and the file checksums.
    """
    if not manifest.outputs:
        raise ValidationFailed("manifest item missing: outputs (the output signature; serving validation "
                               "compares the model's outputs on the sample inputs with the expected ones)")


def check_compiled(original: Package, compiled: Package) -> None:
    """The sandbox's compiled package is the original plus one model: same name, signature, samples, owner and
    expiry, the original model kept as the fallback, byte for byte. The sandbox ran model code, so what it
    hands back is checked like any other input."""
    a, b = original.manifest, compiled.manifest
    same = ("name", "version", "flavor", "inputs", "outputs", "owner", "expiry_seconds", "samples_file", "tolerance",
            "allow_nonfinite")
    changed = [f for f in same if getattr(a, f) != getattr(b, f)]
    if changed:
        raise CompileFailed(f"the compiled package changed {', '.join(changed)}: refused")
    if (b.fallback_runtime, b.fallback_model_file) != (a.runtime, a.model_file):
        raise CompileFailed("the compiled package does not keep the original model as its fallback: refused")
    extra = set(b.files) - set(a.files)
    if any(b.files.get(p) != h for p, h in a.files.items()) or extra != {b.model_file}:
        raise CompileFailed("the compiled package's files are not the original's plus the compiled model: refused")


def check_requested_sha(requested: str | None, actual: str) -> None:
    if requested and requested != actual:
        raise ValidationFailed(f"package sha256 is {actual}, but the request expected {requested}: "
                               "the archive changed or the request names another package")


# --- what to do with a request, given the target state ------------------------------------------


@dataclass(frozen=True, slots=True)
class Proceed:
    """Deploy: nothing is there, or the same package was retired and is deployed again."""


@dataclass(frozen=True, slots=True)
class Noop:
    """The identical package already serves under this name:version."""

    existing: ModelState


@dataclass(frozen=True, slots=True)
class Resume:
    """This very deployment already wrote the target state (then crashed): publish and complete."""

    existing: ModelState


@dataclass(frozen=True, slots=True)
class Conflict:
    reason: str


Decision = Proceed | Noop | Resume | Conflict


_COMPARED_FIELDS = ("flavor", "inputs", "outputs", "owner", "expiry_seconds", "samples_file", "tolerance")


def manifest_differences(requested: Manifest, existing: Manifest) -> list[str]:
    """What differs between a package and the one a name:version already holds, in words; [] for the same content.

    Two archives of the same files (re-packed: other mtimes, order or compression) have other sha256s
    but the same manifest, which lists the sha256 of every file. A stored package compiled at ingest
    (`fallback_model_file` set) holds the original's files plus the compiled model, which is left out.
    """
    diffs = []
    for name in _COMPARED_FIELDS:
        before, after = getattr(existing, name), getattr(requested, name)
        if before != after:
            shown = (lambda v: msgspec.json.encode(v).decode()[:60])  # noqa: E731 - two values, one format
            diffs.append(f"{name} {shown(before)} -> {shown(after)}")
    original_model = existing.fallback_model_file or existing.model_file
    if requested.model_file != original_model:
        diffs.append(f"model_file {original_model!r} -> {requested.model_file!r}")
    compiled = {existing.model_file} if existing.fallback_model_file else set()
    held = {p: d for p, d in existing.files.items() if p not in compiled}
    for path in sorted(set(held) | set(requested.files)):
        if path not in requested.files:
            diffs.append(f"file {path} removed")
        elif path not in held:
            diffs.append(f"file {path} added")
        elif held[path] != requested.files[path]:
            diffs.append(f"file {path} changed (sha256 {held[path][:12]} -> {requested.files[path][:12]})")
    return diffs


def decide_deploy(existing: ModelState | None, existing_source_sha: str | None, sha256: str,
                  deployment_id: str) -> Decision:
    """Decide from the current target of name:version.

    `sha256` is the requested archive's; `existing_source_sha` the archive the existing target was
    deployed from (the stored package may be a compiled form of it, with another sha256).
    """
    if existing is None:
        return Proceed()
    same = sha256 in (existing.sha256, existing_source_sha)
    if existing.deployment_id == deployment_id and existing.target == "serving":
        return Resume(existing)
    if not same:
        return Conflict(
            f"{existing.name}:{existing.version} already holds package {existing.sha256[:12]} "
            f"(deployment {existing.deployment_id}, {existing.target}); versions are immutable: "
            "deploy this package under a new version")
    if existing.target == "serving":
        return Noop(existing)
    return Proceed()


# --- what a deployment publishes and records ----------------------------------------------------


def model_state_for(manifest: Manifest, request: DeployRequested, *, package_key: str, sha256: str,
                    runtime: str, resources: Resources, now: float) -> ModelState:
    """The target state of a deployed package: the request's owner/expiry override the manifest's."""
    return ModelState(
        name=manifest.name, version=manifest.version, target="serving",
        package_uri=f"store:{package_key}", sha256=sha256, runtime=runtime, flavor=manifest.flavor,
        owner=request.owner or manifest.owner,
        expiry_seconds=request.expiry_seconds or manifest.expiry_seconds,
        pinned=request.pinned, deployment_id=request.deployment_id, deployed_at=now,
        resources=resources, at=now,
    )


def retired_state(existing: ModelState, reason: str, now: float) -> ModelState:
    return msgspec.structs.replace(existing, target="retired", reason=reason or "retired", at=now)


class RecordStep(msgspec.Struct, kw_only=True):
    """One step of a deployment as it last stood (the record keeps the history the topic may lose)."""

    step: str
    status: str
    detail: str = ""
    duration_ms: float | None = None
    at: float = 0.0


class AcceptedRequest(msgspec.Struct, kw_only=True):
    """`requests/<id>.json`: a request accepted and not ended yet. Written by the API before it publishes
    (and by the pipeline when a request came straight from the topic), deleted once the record exists.
    On start ingest publishes again each one the deploy-request topic lost; `pickups` counts how often
    a pipeline started it, so a request that keeps killing ingest fails instead of looping."""

    request: DeployRequested | RetireRequested
    accepted_at: float
    pickups: int = 0
    step: str = ""


MAX_PICKUPS = 3


class DeploymentRecord(msgspec.Struct, kw_only=True):
    """`deployments/<id>.json`: written once, when a deployment ends (completed or failed)."""

    deployment_id: str
    kind: Literal["deploy", "retire"] = "deploy"
    status: Literal["completed", "failed"]
    model: str = ""
    version: str = ""
    sha256: str = ""  # the stored package
    source_sha256: str = ""  # the archive that was requested
    runtime: str = ""
    noop: bool = False
    existing_deployment_id: str | None = None
    failed_step: str = ""
    reason: str = ""
    timings_ms: dict[str, float] = {}
    requested_at: float = 0.0
    finished_at: float = 0.0
    steps: list[RecordStep] = []


record_encoder = msgspec.json.Encoder()
record_decoder = msgspec.json.Decoder(DeploymentRecord)
accepted_decoder = msgspec.json.Decoder(AcceptedRequest)
accepted_encoder = msgspec.json.Encoder()
