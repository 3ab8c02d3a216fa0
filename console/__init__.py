"""The console: one web page a team keeps open, served by the deployment API under `/console`.

Live from the bus (`feed`: one consumer per API process of the deployment, model-state, traffic
and rollout, usage, health, shadow-comparison and retirement topics; the store is never polled),
folded into `state`, turned into figures (`figures`) and server-rendered HTML (`render`, `svg`),
and pushed to browsers as server-sent events through bounded per-browser queues (`fanout`).
`api` mounts it on the deployment API: the page, the stream, the sign-in form, static files.

Sits above rollout and retirement (it reuses their folds and policies) and below the shell,
which mounts it (`modelcd.wiring.api_routes`).
"""
