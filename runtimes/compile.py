"""Compile: convert a scikit-learn package to ONNX when, and only when, it provably predicts the same.

Invariants:

- Pure and synchronous: a package in, a `CompileResult` out; nothing is published or stored here.
- A compiled package is only produced when the ONNX model, run through the serving `onnx` runtime, matches the
  sklearn model (run through the serving `sklearn` runtime) on every sample output within the manifest's
  tolerance. It keeps the original model as the fallback (`fallback_runtime="sklearn"`,
  `fallback_model_file=<original>`), the same signature and samples, and records the original package id in
  `labels["modelcd.compiled-from"]`. Its archive is new, so its sha256 differs.
- Otherwise the original package comes back unchanged (same bytes, same sha256) with `compiled=False` and a
  reason saying why (not sklearn, already compiled, no converter, conversion error, outputs differ, ...).
- Deterministic: compiling the same package twice gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from modelcd.runtimes.flavors import ModelRuntimeError, create_runtime, outputs_match
from modelcd.store.package import BuiltPackage, Package, PackageError, assemble_package

__all__ = ["COMPILED_FROM_LABEL", "CompileResult", "compile_package"]

COMPILED_FROM_LABEL: Final = "modelcd.compiled-from"
_ONNX_FILE: Final = "model.onnx"


@dataclass(frozen=True, slots=True)
class CompileResult:
    """The package to deploy, whether it is the compiled one, and why (or why not)."""

    package: BuiltPackage
    compiled: bool
    reason: str


def _skl2onnx_convert(model: Any, name: str, input_name: str, n_features: int, target_opset: int | None) -> bytes:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.base import is_classifier

    # zipmap off: probabilities as a [n, k] tensor rather than a list of dicts; it only applies to classifiers.
    options = {"zipmap": False} if is_classifier(model) else None
    # An explicit graph name: skl2onnx defaults to a random uuid, which would make compiling non-deterministic.
    onx = convert_sklearn(model, name=name, initial_types=[(input_name, FloatTensorType([None, n_features]))],
                          options=options, target_opset=target_opset)
    data: bytes = onx.SerializeToString()
    return data


def compile_package(package: Package, *, trusted_types: Sequence[str] = (), trust_pickle: bool = False,
                    target_opset: int | None = None) -> CompileResult:
    """Try to compile an sklearn package to ONNX (float32 inputs); see the module docstring for the guarantees.

    `trusted_types` and `trust_pickle` are passed to the sklearn runtime that loads the original model. Never
    raises for a model that cannot be compiled; that is `compiled=False` with a reason.
    """
    m = package.manifest
    original = package.built()

    def unchanged(reason: str) -> CompileResult:
        return CompileResult(package=original, compiled=False, reason=reason)

    if m.flavor != "sklearn":
        return unchanged(f"flavor {m.flavor} has no compiler (only sklearn compiles, to onnx)")
    if m.runtime != "sklearn":
        return unchanged(f"already compiled to {m.runtime}")
    if len(m.inputs) != 1 or len(m.inputs[0].shape) != 2 or m.inputs[0].shape[1] < 1:
        return unchanged(f"compile needs one input tensor [batch, n_features], the signature has "
                         f"{[(s.name, s.shape) for s in m.inputs]}")
    spec = m.inputs[0]
    if spec.datatype not in ("FP32", "FP64", "INT32", "INT64"):
        return unchanged(f"compile needs numeric inputs, {spec.name!r} is {spec.datatype}")
    try:
        samples = package.samples()
        sk = create_runtime("sklearn", package.read(m.model_file), inputs=m.inputs, outputs=m.outputs,
                            model_file=m.model_file, trust_pickle=trust_pickle, trusted_types=trusted_types)
        try:
            expected = sk.predict(samples.inputs)
            model = sk.model  # type: ignore[attr-defined]
        finally:
            sk.close()
    except (ModelRuntimeError, PackageError) as exc:
        return unchanged(f"cannot run the sklearn model: {exc}")

    try:
        onnx_bytes = _skl2onnx_convert(model, f"{m.name}-{m.version}", spec.name, spec.shape[1], target_opset)
    except ImportError as exc:
        return unchanged(f"skl2onnx is not installed (pip install 'modelcd[onnx]'): {exc}")
    except Exception as exc:  # skl2onnx raises many types (RuntimeError, NotImplementedError, MissingShapeCalculator)
        return unchanged(f"skl2onnx cannot convert {type(model).__name__}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}")

    try:
        ox = create_runtime("onnx", onnx_bytes, inputs=m.inputs, outputs=m.outputs, model_file=_ONNX_FILE)
        try:
            actual = ox.predict(samples.inputs)
        finally:
            ox.close()
    except ModelRuntimeError as exc:
        return unchanged(f"the converted ONNX model does not run: {exc}")
    if reason := outputs_match(expected, actual, m.tolerance):
        return unchanged(f"the ONNX model differs from the sklearn model on the samples: {reason}")

    contents = dict(package.contents)
    onnx_file = _ONNX_FILE if _ONNX_FILE not in contents else f"compiled-{_ONNX_FILE}"
    contents[onnx_file] = onnx_bytes
    manifest = msgspec.structs.replace(
        m, runtime="onnx", model_file=onnx_file, fallback_runtime="sklearn", fallback_model_file=m.model_file,
        labels={**m.labels, COMPILED_FROM_LABEL: package.sha256}, files={**m.files, onnx_file: "0" * 64},
    )
    compiled = assemble_package(manifest, contents, compress=package.data[:2] == b"\x1f\x8b")
    return CompileResult(package=compiled, compiled=True,
                         reason=f"compiled to onnx; outputs equal within {m.tolerance} on "
                                f"{len(next(iter(samples.inputs.values())))} samples")
