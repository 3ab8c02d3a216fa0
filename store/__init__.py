"""The Model Artifact & Config store: the package format, the blob store and the target state.

Every other part reads through this one; only ingest (publish) and retirement's gc write packages.

- `package`: the package format — `Manifest`, `TensorSpec`, the datatype table (`DATATYPES`), assembling
  a deterministic, content-addressed archive (`assemble_package`) and reading one defensively
  (`read_package`, `extract_package`). Pure: no model library, no asyncio.
- `blobs`: the blob store behind one `Store` protocol — `LocalStore` (a directory, the embedded default)
  and `S3Store` (aioboto3) — with atomic, create-only writes and content-addressed packages
  (`put_package`, `get_package`, `open_store`).
- `targets`: the target state kept in the store (which name:version serves, each endpoint's traffic
  policy): the source of truth that nodes reconcile against; events are the fast path.

Imports only `modelcd.events` and the bottom of `modelcd/` (settings, logs).
"""
