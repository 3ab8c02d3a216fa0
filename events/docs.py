"""`docs/events.md`, generated from the JSON Schemas: what an outside producer or consumer needs.

Everything on the page comes from the Structs (field types, defaults, descriptions with units),
the topic specs (key, cleanup) and the codec (headers), so the page cannot say something the
code does not do: `modelcd schemas docs --out docs/events.md` writes it, and a test fails when
the file in the repository differs from what this module renders.
"""

from __future__ import annotations

import json
import typing
from typing import Any

import msgspec

from .codec import encode
from .schemas import (
    TOPIC_EVENTS, AnalysisThresholds, Criterion, DeploymentCompleted, DeploymentFailed, DeploymentProgress,
    DeployRequested, Event, LoadedModel, ModelHealth, ModelState, NodeDrain, NodeStatus, PredictionLog, Resources,
    RetirementDecision, RetirementWarning, RetireRequested, RolloutPlan, RolloutStep, Route, ShadowComparison,
    ShadowPrediction, ShadowRelation, TrafficPolicy, UsageReport,
)
from .topics import TOPICS

T0 = 1767225600.0  # 2026-01-01T00:00:00Z: every example's clock
_TENSOR_IN = {"input": {"datatype": "FP64", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}}
_TENSOR_OUT = {"label": {"datatype": "INT64", "shape": [1], "data": [0]}}

# One example per event type: realistic values, fixed so the page is stable.
EXAMPLES: dict[type[Event], Event] = {
    DeployRequested: DeployRequested(
        deployment_id="churn-3-build-1842", model="churn", package_uri="s3://ml-artifacts/churn/churn-3.tar",
        sha256="9f2c" + "0" * 60, owner="growth-team", expiry_seconds=30 * 86400, requested_by="airflow:churn_train",
        requested_at=T0),
    RetireRequested: RetireRequested(deployment_id="retire-churn-2", model="churn", version="2",
                                     reason="replaced by 3", requested_by="ann", requested_at=T0),
    DeploymentProgress: DeploymentProgress(deployment_id="churn-3-build-1842", model="churn", version="3",
                                           step="compile", status="succeeded", detail="compiled to onnx",
                                           duration_ms=412.5, at=T0 + 2),
    DeploymentCompleted: DeploymentCompleted(deployment_id="churn-3-build-1842", model="churn", version="3",
                                             sha256="9f2c" + "0" * 60, runtime="onnx",
                                             timings_ms={"validate": 35.0, "compile": 412.5,
                                                         "serving-validation": 820.1, "publish": 12.0}, at=T0 + 3),
    DeploymentFailed: DeploymentFailed(deployment_id="churn-4-build-1850", model="churn", version="4",
                                       step="serving-validation",
                                       reason="outputs differ from the package's expected outputs on row 3",
                                       at=T0 + 3),
    ModelState: ModelState(name="churn", version="3", target="serving", package_uri="store:packages/9f2c.tar",
                           sha256="9f2c" + "0" * 60, runtime="onnx", flavor="sklearn", owner="growth-team",
                           expiry_seconds=30 * 86400, deployment_id="churn-3-build-1842", deployed_at=T0 + 3,
                           resources=Resources(memory_bytes=52_428_800, load_ms=180.0, predict_us=95.0), at=T0 + 3),
    TrafficPolicy: TrafficPolicy(endpoint="churn", routes=[Route(model="churn", version="2", weight=90.0),
                                                           Route(model="churn", version="3", weight=10.0)],
                                 shadows=[ShadowRelation(primary="churn", shadow="churn:4", start=T0,
                                                         end=T0 + 14 * 86400, sample_rate=0.1,
                                                         criteria=[Criterion(field="header:x-region", value="eu")])],
                                 revision=7, reason="rollout step 1", at=T0),
    RolloutStep: RolloutStep(endpoint="churn", rollout_id="r-5c1e", action="start", canary="churn:3",
                             baseline="churn:2", weight=1.0, plan=RolloutPlan(name="fast", steps=[10.0, 100.0],
                                                                              interval_s=120.0,
                                                                              thresholds=AnalysisThresholds()),
                             baseline_routes=[Route(model="churn", version="2", weight=100.0)], at=T0),
    PredictionLog: PredictionLog(request_id="3f1b2c", model="iris", version="1", endpoint="iris",
                                 node="node-a:8081", inputs=_TENSOR_IN, outputs=_TENSOR_OUT, latency_ms=0.42,
                                 at=T0),
    ShadowPrediction: ShadowPrediction(request_id="3f1b2c", primary_model="iris", primary_version="1",
                                       shadow_model="iris", shadow_version="2", primary_outputs=_TENSOR_OUT,
                                       shadow_outputs=_TENSOR_OUT, primary_latency_ms=0.42,
                                       shadow_latency_ms=0.51, node="node-a:8081", at=T0),
    ShadowComparison: ShadowComparison(primary="iris:1", shadow="iris:2", window_start=T0, window_end=T0 + 60,
                                       count=120, agreement=0.975,
                                       primary_latency_ms={"p50": 0.4, "p90": 0.6, "p99": 1.2},
                                       shadow_latency_ms={"p50": 0.5, "p90": 0.7, "p99": 1.5}, at=T0 + 65),
    UsageReport: UsageReport(model="iris", version="1", node="node-a:8081", interval_start=T0,
                             interval_end=T0 + 10, count=1250, errors=2, last_used=T0 + 9.8, at=T0 + 10),
    NodeStatus: NodeStatus(node="node-a:8081", url="http://10.0.0.5:8081", ready=True,
                           models=[LoadedModel(name="iris", version="1", sha256="ab12" + "0" * 60,
                                               memory_bytes=1_048_576)],
                           memory_bytes=1_048_576, memory_budget=2 * 1024**3, at=T0),
    ModelHealth: ModelHealth(node="node-a:8081", model="iris", version="1", ok=True, check="samples",
                             latency_ms=1.3, at=T0),
    NodeDrain: NodeDrain(node="node-a:8081", reason="replaced by release 0.2.0", at=T0),
    RetirementWarning: RetirementWarning(model="churn", version="2", owner="growth-team", last_used=T0,
                                         retire_at=T0 + 30 * 86400, at=T0 + 24 * 86400),
    RetirementDecision: RetirementDecision(model="churn", version="2", owner="growth-team", action="retire",
                                           reason="unused for 30d (expiry 30d)", last_used=T0, at=T0 + 30 * 86400),
}

# What the record key is, per topic, in words (the example shows a value).
KEYS = {
    "modelcd.deploy-requests": "the model name (`model`); a request that leaves `model` empty is keyed by its "
                               "`deployment_id`",
    "modelcd.deployments": "the deployment id",
    "modelcd.model-state": "`name:version`",
    "modelcd.traffic": "the endpoint name",
    "modelcd.predictions": "the model name",
    "modelcd.shadow-predictions": "the primary model's name",
    "modelcd.shadow-comparisons": "`primary/shadow` (both as `name:version`)",
    "modelcd.usage": "the model name",
    "modelcd.health": "the node id",
    "modelcd.retirement": "the model name",
}

INTRO = """\
# Events

<!-- Generated by `modelcd schemas docs --out docs/events.md` from events/schemas/*.py; do not edit. -->

Every change of state in modelcd is an event on a Kafka topic. This page is for programs outside
modelcd that produce or consume them: a training pipeline that asks for a deployment, an analyst
who reads prediction logs, a dashboard that follows the fleet. The JSON Schema of each topic is in
`events/schemas/<topic>.schema.json` (`modelcd schemas export`); the field descriptions below are
the same text.

## The record

- **Value**: the event as a JSON object (UTF-8). Its `type` field names the event and its schema
  version (`modelcd.deploy.requested.v1`); unknown fields are ignored, so readers of an older
  version keep working when fields are added. A change that would break old readers gets a new
  `type`.
- **Key**: UTF-8, chosen so that every event of one entity lands on one partition, in order (the
  key of each topic is given below). Use it: a deploy request keyed by anything else than its model
  name may be handled out of order with another request for the same model.
- **Headers**: the CloudEvents Kafka binding, binary mode. modelcd always writes all of them:

  | header | value |
  | --- | --- |
  | `ce_specversion` | `1.0` |
  | `ce_id` | a unique id of this event (consumers drop a second event with the same id: a retried send is harmless) |
  | `ce_source` | who emitted it, e.g. `ingest`, `serving/node-a:8081`, `airflow:churn_train` |
  | `ce_type` | **the value's `type`**; a record whose `ce_type` differs from its value's `type` is refused (logged, counted, skipped) |
  | `ce_time` | when it was emitted, RFC 3339 |
  | `content-type` | `application/json` |

  An outside producer should send them all. modelcd reads a record without headers (the value's
  `type` decides), but without `ce_id` it cannot tell a redelivery from a new request.
- **Times** in values are seconds since the Unix epoch (UTC, fractional: a JSON number);
  durations say their unit in the field name (`expiry_seconds`, `latency_ms`, `interval_s`).

## Deploying from a training pipeline

Produce a `DeployRequested` on `modelcd.deploy-requests`, keyed by the model name:

- `package_uri` is where **ingest** fetches the archive: `s3://bucket/key` (ingest's S3
  credentials), `file:///absolute/path.tar` (an absolute path **on the ingest host**, not on the
  pipeline's machine; a regular file), or `store:<key>`. A relative or remote `file:` path fails
  the deployment. (The same `file://` URI sent to the HTTP API is accepted only under a directory
  listed in `MODELCD_FILE_URI_DIRS`.)
- Set `deployment_id` yourself (any unique string, e.g. your run id) to follow the deployment: its
  progress is on `modelcd.deployments` keyed by that id, and `GET /deployments/{id}` on the
  deployment API answers for deployments that came from the topic exactly as for uploads (404
  until ingest has read the request, so retry on 404 for a few seconds). Left out, ingest makes
  one up: find it with `modelcd deployments --model NAME` (`GET /deployments?model=NAME`, newest
  first) or on `modelcd.deployments`.
- `owner`, `expiry_seconds` and `pinned` override the manifest; `sha256` makes ingest refuse an
  archive that is not the one you built.
- The deployment ends with exactly one `DeploymentCompleted` or `DeploymentFailed` (whose `reason`
  says what to fix).

A complete producer with confluent-kafka (run as a test, `tests/test_events_examples.py`):

```python
import json, time, uuid
from confluent_kafka import Producer

event = {
    "type": "modelcd.deploy.requested.v1",
    "deployment_id": f"churn-3-{uuid.uuid4().hex[:8]}",
    "model": "churn",
    "package_uri": "file:///srv/models/churn-3.tar",   # absolute, on the ingest host
    "owner": "growth-team",
    "expiry_seconds": 30 * 86400,
    "requested_by": "airflow:churn_train",
    "requested_at": time.time(),
}
producer = Producer({"bootstrap.servers": "localhost:9092", "acks": "all"})
producer.produce(
    "modelcd.deploy-requests",
    key=event["model"],
    value=json.dumps(event).encode(),
    headers=[
        ("ce_specversion", b"1.0"),
        ("ce_id", uuid.uuid4().hex.encode()),
        ("ce_source", b"airflow:churn_train"),
        ("ce_type", event["type"].encode()),            # must equal the value's "type"
        ("ce_time", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()).encode()),
        ("content-type", b"application/json"),
    ],
)
producer.flush(10)
# then: GET http://<ingest>:8080/deployments/<deployment_id> until "status" is "completed" or "failed"
```

## Reading prediction logs

`modelcd logs export --since 1h --out logs.parquet` writes the sampled prediction logs of every
node into one Parquet file (one row per prediction: `request_id`, `model`, `version`, `endpoint`,
`node`, `at` as a UTC timestamp, `latency_ms`, `status`, `error`, `source`, and one column per input
and output tensor holding its values); `--model` and `--version` narrow it, `--out logs.csv` or `-`
(JSON lines) too. A node does not log a request it shadows (the primary's answer travels in the
`ShadowPrediction` on `modelcd.shadow-predictions`): the export adds those requests, with
`source` = `shadow` and no inputs (`--no-shadowed` leaves them out). Refused requests (4xx) are
logged too, with their `status` and `error`.
In pandas:

```python
import pandas as pd
logs = pd.read_parquet("logs.parquet")
logs.groupby(["model", "version"]).latency_ms.describe()
```

From Kafka directly, each record's value is a `PredictionLog`; read every partition of
`modelcd.predictions` from the beginning. Against the embedded broker (`modelcd up` without
`MODELCD_KAFKA_BOOTSTRAP`) do not stop at the reported high watermark, which is below the true
end (see the README, "Embedded vs distributed"): stop when polls come back empty. With
confluent-kafka (run as a test too):

```python
import json
import pandas as pd
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

topic = "modelcd.predictions"
consumer = Consumer({"bootstrap.servers": "localhost:9092", "group.id": "analyst-notebook",
                     "enable.auto.commit": False})
partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
rows, idle = [], 0
while idle < 3:                     # the end: three empty polls in a row, not the high watermark
    msg = consumer.poll(1.0)
    if msg is None or msg.error():
        idle += msg is None
        continue
    idle = 0
    log = json.loads(msg.value())
    rows.append({"model": log["model"], "version": log["version"], "node": log["node"],
                 "at": log["at"], "latency_ms": log["latency_ms"], "request_id": log["request_id"]})
consumer.close()
logs = pd.DataFrame(rows)
logs["at"] = pd.to_datetime(logs["at"], unit="s", utc=True)
logs.to_parquet("logs.parquet", index=False)
```

## Topics
"""


def _type_of(prop: dict[str, Any]) -> str:
    if "$ref" in prop:
        return f"`{prop['$ref'].rsplit('/', 1)[1]}`"
    if "enum" in prop:
        return "one of " + ", ".join(f"`{v}`" for v in prop["enum"])
    if "anyOf" in prop:
        return " or ".join(_type_of(p) for p in prop["anyOf"])
    kind = prop.get("type")
    if kind == "array":
        return f"array of {_type_of(prop.get('items', {}))}"
    if kind == "object":
        extra = prop.get("additionalProperties")
        return f"object of {_type_of(extra)}" if isinstance(extra, dict) and extra else "object"
    return f"{kind}" if kind else "any JSON value"


def _fields_table(definition: dict[str, Any]) -> list[str]:
    required = set(definition.get("required", ()))
    rows = ["| field | type | required / default | meaning |", "| --- | --- | --- | --- |"]
    for name, prop in definition.get("properties", {}).items():
        if name == "type":
            continue
        if name in required:
            need = "required"
        elif "default" in prop:
            need = f"`{json.dumps(prop['default'])}`"
        else:
            need = "generated"  # a default_factory: an id or the current time
        desc = prop.get("description", "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{name}` | {_type_of(prop)} | {need} | {desc} |")
    return rows


def _example(event: Event) -> list[str]:
    key, value, headers = encode(event, "example", event_id="0b7e6f9a2d5c4e1f8a3b9c0d1e2f3a4b")
    shown = [(k, v.decode()) for k, v in headers]
    shown = [(k, "2026-01-01T00:00:00+00:00" if k == "ce_time" else v) for k, v in shown]
    lines = ["```", f"key: {key.decode()}"]
    lines += [f"{k}: {v}" for k, v in shown]
    lines.append("value:")
    lines += json.dumps(json.loads(value), indent=2).splitlines()
    lines.append("```")
    return lines


def render_markdown() -> str:
    """The whole of docs/events.md."""
    out = INTRO.splitlines()
    for topic, union in TOPIC_EVENTS.items():
        members = typing.get_args(union) or (union,)
        spec = TOPICS[topic]
        cleanup = "compacted (a state topic: the last event per key is the state)" if spec.compacted else \
            f"deleted after {spec.retention_ms // 3_600_000} h"
        out += ["", f"### `{topic}`", "",
                f"Key: {KEYS[topic]}. Retention: {cleanup}. Events: "
                + ", ".join(f"`{m.ce_type()}` ({m.__name__})" for m in members) + "."]
        schema = msgspec.json.schema(union)
        defs = schema["$defs"]
        shown: set[str] = set()
        for member in members:
            name = member.__name__
            d = defs[name]
            out += ["", f"#### {name} — `type: {member.ce_type()}`", "",
                    " ".join(d.get("description", "").split()), ""]
            out += _fields_table(d)
            shown.add(name)
            out += ["", "Example record:", ""]
            out += _example(EXAMPLES[member])
        for name in sorted(set(defs) - shown):
            d = defs[name]
            out += ["", f"#### {name} (inside the events above)", "", " ".join(d.get("description", "").split()),
                    ""]
            out += _fields_table(d)
    return "\n".join(out) + "\n"
