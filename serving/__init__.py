"""The prediction node: Open Inference Protocol over HTTP, live loading and unloading, the router.

Modules:
    node.py       `ServingNode` / `run_node`: the I/O shell (state follower, reconciler, loads, telemetry,
                  drain), one TaskGroup
    api.py        the ASGI app: /v2 health, metadata, infer; /metrics
    protocol.py   the OIP codec (JSON and binary tensors)
    registry.py   what is known, loaded, resident; load, evict, predict (in the model's worker), restart, quarantine
    workers.py    the front's side of model workers: the zygote that forks them, one `Worker` per model
    zygote.py     the clean process that forks workers (`python -m modelcd.serving.zygote`)
    worker_main.py inside a worker: confinement (limits, Landlock, seccomp), the load/predict loop
    channel.py    the framing front <-> worker (msgpack header + raw tensor buffers; pure)
    batching.py   stacking queued predictions of one model and splitting the outputs (pure)
    quarantine.py restart backoff and the quarantine decision (pure)
    router.py     compiles a TrafficPolicy into weighted, sticky routing on the request path
    desired.py    which models a node should hold (pure)
    budget.py     memory estimates and the hot set / eviction plan (pure)
    cache.py      the node's local package cache
    telemetry.py  the bounded buffer behind prediction logs, usage, health
    hooks.py      the narrow interface a node lends its shadow executor (predict, signatures, emit)
    metrics.py, errors.py, openapi.py, cli.py (`modelcd serve`)

Model code never runs in the node's own process: every loaded model has a worker process.
Models run through modelcd.runtimes (in the workers); packages come from modelcd.store. The node imports neither
ingest nor the shadow or rollout parts: the shadow executor is handed in (`hooks.ShadowFactory`).
"""
