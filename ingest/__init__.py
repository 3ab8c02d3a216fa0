"""ingest: the deployment API, the pipeline (validate → compile → serving-validate → publish), tracking.

Entry points: `service.run_ingest` (the service `modelcd ingest` and `modelcd up` run), `api.DeploymentApi`
(the ASGI app), `pipeline.Pipeline` (the deploy-request handler), `sandbox.Sandbox` (serving validation in a
child process), `tracking.TrackingView`; the package format (`package`), compile (`compile`), the store
(`store`, `targets`) live here too because only ingest writes them.
"""
