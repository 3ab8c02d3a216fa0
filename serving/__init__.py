"""The prediction node: Open Inference Protocol over HTTP, live loading and unloading, the router.

Modules:
    node.py       `ServingNode` / `run_node`: the I/O shell (state follower, reconciler, loads, telemetry,
                  drain), one TaskGroup
    api.py        the ASGI app: /v2 health, metadata, infer; /metrics
    protocol.py   the OIP codec (JSON and binary tensors)
    registry.py   what is known, loaded, resident; load, evict, predict (inline or in the pool)
    router.py     compiles a TrafficPolicy into weighted, sticky routing on the request path
    desired.py    which models a node should hold (pure)
    budget.py     memory estimates and the hot set / eviction plan (pure)
    cache.py      the node's local package cache
    telemetry.py  the bounded buffer behind prediction logs, usage, health
    hooks.py      the narrow interface a node lends its shadow executor (predict, signatures, emit)
    metrics.py, threads.py, errors.py, openapi.py, cli.py (`modelcd serve`)

Models run through modelcd.runtimes; packages come from modelcd.store. The node imports neither
ingest nor the shadow or rollout parts: the shadow executor is handed in (`hooks.ShadowFactory`).
"""
