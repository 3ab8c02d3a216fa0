"""One typed settings object, read from `MODELCD_*` environment variables.

Built once in `main()` (or a test) and passed down; nothing else reads the
environment. Every field documents itself, and `modelcd config` prints the table
that the README carries.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from modelcd import units

PREFIX = "MODELCD_"


class SettingsError(ValueError):
    """A `MODELCD_*` variable has a value that cannot be used."""


def _doc(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    if default is dataclasses.MISSING:
        return field(metadata={"doc": text}, **kw)
    return field(default=default, metadata={"doc": text}, **kw)


def parse_size(text: str) -> int:
    """'512MiB' / '2g' / '1048576' -> bytes (the grammar of modelcd.units)."""
    try:
        return units.parse_size(text)
    except units.UnitError as exc:
        raise SettingsError(str(exc)) from None


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every setting of every modelcd component; the same names in embedded and distributed mode."""

    kafka_bootstrap: str | None = _doc(
        "Kafka bootstrap servers (host:port,...). Unset: `modelcd up` starts the embedded broker.", None)
    kafka_idempotence: bool | None = _doc(
        "Idempotent producer. Unset: on for an external Kafka, off for the embedded broker (which refuses it).",
        None)
    kafka_client_id: str = _doc("Client id prefix sent to Kafka.", "modelcd")
    topic_partitions: int = _doc("Partitions of each topic modelcd creates.", 3)
    topic_replication: int = _doc("Replication factor of each topic modelcd creates.", 1)
    broker_port: int = _doc("Port of the embedded broker.", 9092)
    broker_storage: str = _doc(
        "Storage URL of the embedded broker: memory://tansu/ (lost on exit) or s3://bucket/.", "memory://tansu/")
    home: Path = _doc("Working directory for local state (store, package cache).", Path(".modelcd"))
    store_url: str | None = _doc(
        "Artifact & config store: a directory path or s3://bucket/prefix. Unset: <home>/store.", None)
    s3_endpoint_url: str | None = _doc("S3 endpoint URL (MinIO, moto...). Unset: AWS.", None)
    ingest_host: str = _doc("Address the deployment API listens on.", "127.0.0.1")
    ingest_port: int = _doc("Port of the deployment API.", 8080)
    ingest_url: str | None = _doc("URL the CLI uses for the deployment API. Unset: http://<ingest_host>:<ingest_port>.", None)
    api_token: str | None = _doc("Bearer token the deployment API requires. Unset: no authentication.", None)
    max_upload_bytes: int = _doc("Largest request body the deployment API accepts (bytes or 512MiB).", 256 * 1024**2)
    max_package_bytes: int = _doc(
        "Largest unpacked size of a package (all its files together, bytes or 2GiB); bounds gzip bombs.", 2 * 1024**3)
    max_package_ratio: float = _doc(
        "Largest ratio of a gzip package's unpacked size to its compressed size (above 64 MiB unpacked); bounds "
        "gzip bombs before MODELCD_MAX_PACKAGE_BYTES is reached.", 30.0)
    package_read_timeout: float = _doc(
        "Seconds ingest may take to fetch a package and read it (gunzip, tar walk, checksums) before the "
        "deployment fails.", 60.0)
    file_uri_dirs: str | None = _doc(
        "Directories (separated by ':') under which the deployment API accepts file:// package URIs. Unset: the "
        "API refuses file:// URIs (the deploy-request topic still takes them; either way only regular files).",
        None)
    structural_checks: bool = _doc(
        "Check a model's structure before anything loads it (tree child and feature indices in range, no cycles "
        "in scikit-learn, XGBoost and LightGBM trees); turn off only to test the sandbox.", True)
    compile_timeout: float = _doc(
        "Seconds the sandbox may spend on the structural checks, and then on compiling, before it is killed.", 60.0)
    validation_timeout: float = _doc("Seconds a package may take in serving validation before it is killed.", 60.0)
    deploy_retry_time: float = _doc(
        "Seconds ingest keeps retrying a deployment whose store, broker or package source fails transiently "
        "(with backoff), before the deployment fails with the last error as its reason.", 120.0)
    deploy_timeout: float = _doc(
        "Seconds one attempt at a deployment may take, every step included, before the deployment fails.", 900.0)
    upload_retention: float = _doc(
        "Seconds a staged upload (store uploads/) whose deployment never ended is kept before `modelcd gc` "
        "deletes it.", 24 * 3600.0)
    validation_memory: int = _doc("Address-space limit of the sandbox that checks, compiles and validates a "
                                  "package (bytes or 2GiB).", 4 * 1024**3)
    validation_warm: bool = _doc("Fork each sandbox process from a zygote that imported the libraries once "
                                 "(scikit-learn, skops, skl2onnx; shared copy-on-write), so a deployment neither "
                                 "waits for nor spends ~1 s of CPU on an interpreter. false: a fresh interpreter per "
                                 "deployment.", True)
    validation_nice: int = _doc("Niceness (0-19) of the sandbox processes that check, compile and validate "
                                "packages, so a serving node on the same cores wins the CPU (0: ingest's own "
                                "priority).", 19)
    compile_onnx: bool = _doc("Try to compile scikit-learn models to ONNX at ingest.", True)
    serving_host: str = _doc("Address a serving node listens on.", "127.0.0.1")
    serving_port: int = _doc("Port of the (first) serving node.", 8081)
    node_id: str | None = _doc("Name of this serving node. Unset: hostname:port.", None)
    memory_budget: int = _doc("Resident bytes of loaded models a node may hold (bytes or 2GiB); LRU beyond.", 2 * 1024**3)
    model_overhead: int = _doc("Bytes the memory budget charges each loaded model on top of its own size: its worker "
                               "process (measured ~7.3 MiB PSS per small model's worker on x86_64; bytes or 8MiB).",
                               8 * 1024**2)
    replicas: int = _doc("Serving nodes each model is placed on (a model's own `replicas` wins); nodes load only "
                         "what is placed on them. 0: every node loads every model.", 2)
    handoff_timeout: float = _doc("Seconds a stopping node keeps serving while its models load on the nodes they "
                                  "move to (0: stop at once).", 60.0)
    frontdoor_admin_port: int = _doc("Port of the front door's (Caddy's) admin API, on 127.0.0.1.", 2019)
    frontdoor_health_interval: float = _doc("Seconds between the front door's health checks of each node.", 1.0)
    load_concurrency: int = _doc("Models a node loads at once.", 2)
    reconcile_interval: float = _doc("Seconds between a node's reconciliations against the store.", 30.0)
    predict_timeout: float = _doc("Seconds a prediction may take before it answers 504.", 10.0)
    usage_interval: float = _doc("Seconds over which usage is aggregated into one UsageReport per model.", 10.0)
    heartbeat_interval: float = _doc("Seconds between NodeStatus heartbeats.", 5.0)
    health_interval: float = _doc("Seconds between ModelHealth checks on sample data.", 60.0)
    prediction_log_rate: float = _doc("Default share of predictions logged to modelcd.predictions.", 0.01)
    telemetry_buffer: int = _doc("Events buffered for publishing before new ones are dropped.", 10_000)
    worker_memory: int = _doc("Address-space limit of each model worker process (RLIMIT_AS, bytes or 4GiB; 0: none): "
                              "a model past it gets MemoryError or dies, alone.", 4 * 1024**3)
    worker_nice: int = _doc("Niceness added to model worker processes, so the node's front (HTTP, bus) wins the CPU "
                            "from a spinning model (0: same priority).", 5)
    ready_window: float = _doc("A restarting node loads the models requested within this many seconds (and pinned "
                               "ones) before it reports ready, and the rest of its hot set after; 0: the whole hot "
                               "set before ready.", 86_400.0)
    batch_nice: int = _doc("Niceness `modelcd up` gives its batch services (ingest, the shadow comparison, the "
                           "rollout controller, retirement), so serving nodes on the same machine win the CPU "
                           "(0: same priority).", 10)
    worker_threads: int = _doc("Threads a model library may use inside its worker (OpenMP/BLAS/ONNX Runtime).", 1)
    worker_spawn: bool = _doc("Let model workers start processes (fork, exec). Off: a seccomp filter refuses them.",
                              False)
    worker_spares: int = _doc("Idle model workers a node keeps forked and confined ahead of need, so a load (a cold "
                              "model's first request, a restart) does not wait for one; each is charged "
                              "MODELCD_MODEL_OVERHEAD in the memory budget (0: fork one per load).", 1)
    worker_batch: bool = _doc("Run predictions of one model that are waiting together as one call on the stacked "
                              "rows, for models whose sample rows predicted alone equal the batch's (checked at "
                              "load). Off: one call per request.", True)
    worker_queue: int = _doc("Predictions that may wait on one model's worker; beyond, 503.", 256)
    worker_crash_limit: int = _doc("Deaths of a model's worker within MODELCD_WORKER_CRASH_WINDOW after which the "
                                   "model is quarantined on the node instead of restarted.", 3)
    worker_crash_window: float = _doc("Seconds over which a model's worker deaths are counted.", 300.0)
    worker_restart_backoff: float = _doc("Seconds before a model whose worker died restarts; doubles with each "
                                         "death in the window.", 0.5)
    worker_restart_backoff_max: float = _doc("Longest wait before a model whose worker died restarts.", 30.0)
    load_timeout: float = _doc("Seconds a model may take to load (and a request may wait for it) before failing.", 120.0)
    max_request_bytes: int = _doc("Largest inference request body a serving node accepts (bytes or 64MiB).",
                                  32 * 1024**2)
    max_inflight_bytes: int = _doc(
        "Request bytes a serving node holds at once (bodies being read or answered; bytes or 64MiB); beyond, "
        "new requests get 503 with Retry-After. A JSON body's decoded tensors take a few times its size (four "
        "concurrent 23 MB JSON requests: +560 MB RSS unbounded, +284 MB at 64MiB).", 64 * 1024**2)
    max_response_bytes: int = _doc(
        "Largest inference response a serving node sends (bytes or 64MiB); a larger one is refused with a 400 "
        "saying to send fewer rows per request.", 64 * 1024**2)
    load_wait: float = _doc(
        "Seconds a request for a model that is deployed but not loaded yet waits for the load before it gets 503 "
        "with Retry-After (a model the node evicted for its memory budget is reloaded within the request).", 1.0)
    drain_timeout: float = _doc("Seconds a stopping node waits for in-flight requests, then telemetry, to finish.",
                                10.0)
    rollout_tick: float = _doc("Seconds between the rollout controller's checks for analyses that are due.", 1.0)
    rollout_max_samples: int = _doc(
        "Prediction logs, usage reports and shadow predictions the rollout controller keeps per rollout.", 20_000)
    retirement_warn_share: float = _doc(
        "Share of a model's expiry period unused after which its owner is warned (0..1).", 0.8)
    retirement_check_interval: float = _doc("Seconds between the retirement processor's expiry checks.", 60.0)
    retirement_webhook_url: str | None = _doc(
        "URL the retirement processor POSTs warnings and decisions to (JSON). Unset: log lines only.", None)
    gc_retention: float = _doc("Seconds a retired package is kept in the store before `modelcd gc` deletes it.",
                               7 * 24 * 3600.0)
    shadow_queue: int = _doc("Shadow jobs a node queues; beyond, new shadow work is dropped (and counted).", 1000)
    shadow_workers: int = _doc("Tasks per node that run shadow predictions.", 2)
    shadow_timeout: float = _doc("Seconds a shadow prediction may take before it is recorded as a timeout.", 5.0)
    shadow_pause_queue: int = _doc("Queued shadow jobs at which a node pauses shadowing (0: off).", 800)
    shadow_pause_lag_ms: float = _doc("Event-loop lag (ms) at which a node pauses shadowing (0: off).", 100.0)
    shadow_pause_p99_ms: float = _doc("Primary p99 latency (ms, over 10 s) at which a node pauses shadowing (0: off).",
                                      0.0)
    shadow_pause_busy: float = _doc("Share of time the event loop is busy (0..1, over 1 s) at which a node pauses "
                                    "shadowing; it resumes at 0.8 x this (0: off).", 0.9)
    shadow_resume_ratio: float = _doc("Shadowing resumes once every pressure signal is below this share of its "
                                      "pause threshold.", 0.5)
    feature_store_url: str | None = _doc(
        "Online feature store for shadows (redis://host:port/db). Unset: shadows get the request's own inputs.", None)
    comparison_window: float = _doc("Seconds of each tumbling window of the shadow comparison.", 60.0)
    comparison_grace: float = _doc("Seconds a comparison window waits for late shadow predictions.", 5.0)
    log_level: str = _doc("Log level.", "info")
    log_format: str = _doc("auto (console on a terminal, JSON otherwise), json or console.", "auto")

    @property
    def resolved_store_url(self) -> str:
        return self.store_url or str((self.home / "store").resolve())

    @property
    def resolved_ingest_url(self) -> str:
        return self.ingest_url or f"http://{self.ingest_host}:{self.ingest_port}"

    @property
    def bootstrap(self) -> str:
        return self.kafka_bootstrap or f"127.0.0.1:{self.broker_port}"

    @property
    def idempotence(self) -> bool:
        if self.kafka_idempotence is not None:
            return self.kafka_idempotence
        return self.kafka_bootstrap is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = PREFIX + f.name.upper()
            if name in env and env[name] != "":
                values[f.name] = _convert(name, env[name], hints[f.name], f.metadata.get("doc", ""))
        values.update(overrides)
        return cls(**values)

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(variable, default, doc) for every setting."""
        rows = []
        for f in dataclasses.fields(cls):
            default = "" if f.default is None else str(f.default)
            rows.append((PREFIX + f.name.upper(), default, f.metadata["doc"]))
        return rows


_DURATION_SUFFIXES = ("_TIMEOUT", "_INTERVAL", "_BACKOFF", "_BACKOFF_MAX", "_RETENTION", "_WINDOW", "_GRACE",
                      "_WAIT", "_TICK", "_RETRY_TIME")


def _kind(hint: Any) -> str:
    """What a value of this type looks like, in words (never `<class 'int'>`)."""
    text = str(hint)
    for token, words in (("bool", "true or false"), ("int", "a whole number, e.g. 3"),
                         ("float", "a number, e.g. 2.5"), ("Path", "a path")):
        if token in text:
            return words
    return "text"


def _convert(name: str, raw: str, hint: Any, doc: str = "") -> Any:
    text = str(hint)
    # A setting in seconds takes any duration (`7d`, `90s`, `1h30m`, or plain seconds); one in bytes any size.
    seconds = doc.startswith("Seconds") or name.endswith(_DURATION_SUFFIXES)
    try:
        if "bool" in text:
            low = raw.strip().lower()
            if low in {"1", "true", "yes", "on"}:
                return True
            if low in {"0", "false", "no", "off"}:
                return False
            raise SettingsError(f"{raw!r}: expected true or false")
        if name.endswith(("_BUDGET", "_BYTES", "_MEMORY")) or "(bytes or" in doc:
            return parse_size(raw)
        if seconds and "float" in text:
            return units.parse_duration(raw)
        if "int" in text:
            return int(raw)
        if "float" in text:
            return float(raw)
        if "Path" in text:
            return Path(raw)
    except (SettingsError, units.UnitError) as exc:
        raise SettingsError(f"{name}: {exc}") from None
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected {_kind(hint)}") from None
    return raw
