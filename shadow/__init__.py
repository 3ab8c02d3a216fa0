"""Auto-shadow: shadow models on live traffic, published for comparison, never in the caller's way.

Modules (pure cores first):
    criteria.py    which relations apply to a request (time window, criteria, deterministic sampling)
    pressure.py    pause/resume with hysteresis on queue depth, loop lag and primary p99
    relations.py   editing a TrafficPolicy's shadow relations, parsing what users type
    comparison.py  `Window` (pure figures) + the stream processor (`run_comparison`)
    features.py    optional feature-store lookup of only the features the primary lacked
    executor.py    `ShadowExecutor`, the I/O shell a serving node runs beside its requests
    node.py        `attach` (the factory a node is given) and the executor's Prometheus collector
    cli.py         `modelcd shadow add|list|remove|report|compare`

Wiring into a serving node: `node.py` holds `attach`, the `ShadowFactory` (modelcd.serving.hooks)
that `modelcd up` and `modelcd serve` hand a node. The node calls it once with its `NodeHooks`
(its own predict path, the loaded models' input names, its bounded telemetry buffer, the output
converter) and gets back the executor and its Prometheus collector. From then on the node calls
only `ShadowHook`: `update_policy` / `reconcile` with every TrafficPolicy it applies, `run()` in its
TaskGroup, and `offer(PrimaryResult)` after each response was sent (`offer` is synchronous, costs a
dict lookup when nothing shadows that model, never raises; > 0 means the request was shadowed and
its PredictionLog is skipped). Neither side imports the other's internals.
"""

from modelcd.serving.hooks import PrimaryResult
from modelcd.shadow.executor import ExecutorConfig, ShadowExecutor
from modelcd.shadow.features import FeatureFetcher, RedisFeatureStore

__all__ = ["ExecutorConfig", "FeatureFetcher", "PrimaryResult", "RedisFeatureStore", "ShadowExecutor"]
