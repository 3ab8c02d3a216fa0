"""Auto-shadow: shadow models on live traffic, published for comparison, never in the caller's way.

Modules (pure cores first):
    criteria.py    which relations apply to a request (time window, criteria, deterministic sampling)
    pressure.py    pause/resume with hysteresis on queue depth, loop lag and primary p99
    relations.py   editing a TrafficPolicy's shadow relations, parsing what users type
    comparison.py  `Window` (pure figures) + the stream processor (`run_comparison`)
    features.py    optional feature-store lookup of only the features the primary lacked
    executor.py    `ShadowExecutor`, the I/O shell a serving node embeds
    cli.py         `modelcd shadow add|list|remove|report|compare`

Wiring into a serving node (the whole interface; nothing else in serving knows about shadows):

1. Build one executor per node, next to the telemetry::

       from modelcd.shadow.executor import ExecutorConfig, ShadowExecutor
       from modelcd.shadow.features import FeatureFetcher, RedisFeatureStore

       shadow = ShadowExecutor(
           predict=shadow_predict,        # async (model, version, inputs) -> (outputs, latency_ms)
           emit=telemetry.offer,          # the node's bounded publisher (sync or async, never blocks)
           node=node_id,
           config=ExecutorConfig.from_settings(settings),
           convert=tensors_to_log,        # raw outputs -> JSON, done in the worker, off the request path
           features=FeatureFetcher(RedisFeatureStore.from_url(settings.feature_store_url))
                    if settings.feature_store_url else None,
           needs=lambda name, version: ...,  # the shadow's input names from its signature, or None
       )

   where `shadow_predict` resolves `name:version` in the registry, acquires it, runs the
   node's own predict (inline or in the pool, as for any request) and returns its raw
   outputs with the elapsed milliseconds.

2. Start it in the node's TaskGroup: `tg.create_task(shadow.run(), name="shadow")`; at drain,
   call `shadow.stop()` after the HTTP server stopped and before telemetry is drained.

3. Feed it every TrafficPolicy the node applies: `shadow.update_policy(policy)` (in the state
   follower and the reconciler, beside `registry.apply_traffic`).

4. In the infer handler, *after* the response was sent::

       shadowed = shadow.offer(PrimaryResult(
           request_id=request_id, model=entry.name, version=entry.version, inputs=inputs,
           outputs=outputs, latency_ms=elapsed_ms, headers=scope["headers"],
           params=req.parameters or {}, entity=(req.parameters or {}).get("entity_id")))

   `offer` is synchronous, costs a dict lookup when nothing shadows that model, and never
   raises. A result > 0 means the request is shadowed: skip its PredictionLog (the primary's
   output travels in the ShadowPrediction: `criteria.log_primary`).

5. Metrics: `shadow.metrics()` returns {prometheus name: value} (counters `_total`, gauges
   `modelcd_shadow_queue_depth`, `modelcd_shadow_paused`) for the node's /metrics.
"""
