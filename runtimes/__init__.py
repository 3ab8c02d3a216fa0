"""Model runtimes: loading and running each model flavor, the one code both ingest and serving run.

- `flavors`: a `Runtime` per flavor (scikit-learn through skops, ONNX through onnxruntime, XGBoost JSON,
  LightGBM text), `load_runtime` from a package, input checks and output conforming against the
  signature, `outputs_match` (the comparison serving validation and compile use), `serialize_model`.
- `compile`: converting a package to a faster runtime (scikit-learn -> ONNX through skl2onnx) and proving
  equal outputs on its samples, keeping the original as fallback.
- `build`: building a package from a model object or file (`build_package`, `build_from_spec`): the
  model is serialized and run on its samples here; the archive itself is the store's format.

Ingest validates and compiles with these modules and a serving node predicts with them, so what was
checked is what serves. Imports the store (the package format) and nothing above it.
"""
