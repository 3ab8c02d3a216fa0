"""ingest: the deployment API, the pipeline (validate → compile → serving-validate → publish), tracking.

Entry points: `service.run_ingest` (the service `modelcd ingest` and `modelcd up` run), `api.DeploymentApi`
(the ASGI app; other parts mount route groups on it), `pipeline.Pipeline` (the deploy-request handler),
`policy` (the package checks, pure), `sandbox.Sandbox` (serving validation in a child process),
`tracking.TrackingView`. The package format and the store it writes are modelcd.store; the runtimes it
validates and compiles with are modelcd.runtimes.
"""
