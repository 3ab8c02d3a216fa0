"""Building a package from a model object or file: serialize it in its flavor's safe format, run it on its samples.

`build_package` is where a model first meets the code that serves it: the model is serialized (`flavors.serialize_model`),
loaded through the serving runtime and run on the sample inputs, which gives the expected outputs (or checks the given
ones within the tolerance) and the output signature; the archive itself is assembled by `modelcd.store.package`.
`build_from_spec` reads the YAML/JSON spec behind `modelcd package build`. Every failure is a `PackageError` naming
the problem.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy.typing as npt

from modelcd.store.package import (
    BuiltPackage,
    Flavor,
    Manifest,
    PackageError,
    TensorSpec,
    _as_array,
    _infer_specs,
    _shape_fits,
    assemble_package,
    decode_samples,
    encode_samples,
    parse_duration,
)

from .flavors import ModelRuntimeError, create_runtime, outputs_match, serialize_model

__all__ = ["Spec", "build_from_spec", "build_package"]

ArrayLike = Any  # nested lists or numpy arrays
SampleData = Mapping[str, ArrayLike] | ArrayLike


def _sample_arrays(data: SampleData, specs: Sequence[TensorSpec] | None, what: str,
                   default_name: str) -> dict[str, npt.NDArray[Any]]:
    if not isinstance(data, Mapping):
        if specs is not None and len(specs) != 1:
            raise PackageError(f"{what}: a bare array fits a one-tensor signature, this one has {len(specs)}")
        data = {specs[0].name if specs else default_name: data}
    by_name = {s.name: s for s in specs} if specs is not None else None
    arrays: dict[str, npt.NDArray[Any]] = {}
    for name, value in data.items():
        if by_name is not None and name not in by_name:
            raise PackageError(f"{what}: {name!r} is not in the signature ({sorted(by_name)})")
        try:
            arr = _as_array(value, by_name[name].datatype if by_name is not None else None)
        except (ValueError, TypeError) as exc:
            raise PackageError(f"{what}: {name!r} is not a tensor ({exc})") from None
        if arr.ndim == 0 or arr.shape[0] == 0:
            raise PackageError(f"{what}: {name!r} needs a non-empty batch as its first dimension")
        arrays[str(name)] = arr
    if by_name is not None and (missing := sorted(set(by_name) - set(arrays))):
        raise PackageError(f"{what}: missing {missing}")
    return arrays


def build_package(
    model: object,
    *,
    name: str,
    version: str,
    owner: str,
    expiry: int | str,
    sample_inputs: SampleData,
    expected_outputs: SampleData | None = None,
    flavor: Flavor | None = None,
    inputs: Sequence[TensorSpec] | None = None,
    outputs: Sequence[TensorSpec] | None = None,
    tolerance: float = 1e-5,
    description: str = "",
    labels: Mapping[str, str] | None = None,
    trust_pickle: bool = False,
    trusted_types: Sequence[str] = (),
    verify: bool = True,
    compress: bool = False,
) -> BuiltPackage:
    """Build a package from a model object or model file path and sample inputs.

    `sample_inputs` is {input name: array} or one bare array (named "input", or the only name in `inputs`).
    The input signature is inferred from the samples unless given. The model is loaded through the serving
    runtime and run on the samples: that gives the expected outputs unless `expected_outputs` is given (then, with
    `verify`, they must match within `tolerance`), and the output signature unless `outputs` is given.
    `expiry` is seconds or a duration ("30d"). Raises `PackageError` for anything wrong, including the model.
    """
    expiry_seconds = parse_duration(expiry)
    try:
        serialized = serialize_model(model, flavor=flavor, trust_pickle=trust_pickle)
    except ModelRuntimeError as exc:
        raise PackageError(str(exc)) from None
    if flavor is not None and serialized.flavor != flavor:
        raise PackageError(f"flavor {flavor!r} was asked for, but the model is a {serialized.flavor} model")
    in_arrays = _sample_arrays(sample_inputs, inputs, "sample inputs", "input")
    in_specs = list(inputs) if inputs is not None else _infer_specs(in_arrays)
    for spec in in_specs:
        if not _shape_fits(in_arrays[spec.name].shape, spec.shape):
            raise PackageError(f"sample inputs: {spec.name!r} has shape {list(in_arrays[spec.name].shape)}, "
                               f"the signature says {spec.shape}")
    try:
        rt = create_runtime(serialized.flavor, serialized.data, inputs=in_specs, outputs=outputs or (),
                            model_file=serialized.model_file, trust_pickle=trust_pickle, trusted_types=trusted_types)
        try:
            actual = rt.predict(in_arrays)
        finally:
            rt.close()
    except ModelRuntimeError as exc:
        raise PackageError(f"the model does not run on the sample inputs: {exc}") from None
    out_specs = list(outputs) if outputs is not None else _infer_specs(actual)
    if not out_specs:
        raise PackageError("the model produced no outputs")
    if expected_outputs is None:
        out_arrays = {s.name: actual[s.name] for s in out_specs}
    else:
        out_arrays = _sample_arrays(expected_outputs, out_specs, "expected outputs", out_specs[0].name)
        if verify and (reason := outputs_match(out_arrays, actual, tolerance)):
            raise PackageError(f"the model's outputs on the samples differ from the expected outputs: {reason}")
    samples_file = "samples.json"
    contents = {serialized.model_file: serialized.data, samples_file: encode_samples(in_arrays, out_arrays)}
    try:
        manifest = Manifest(
            name=name, version=version, flavor=serialized.flavor,  # type: ignore[arg-type]
            runtime=serialized.flavor, model_file=serialized.model_file, inputs=in_specs, outputs=out_specs,
            owner=owner, expiry_seconds=expiry_seconds, samples_file=samples_file, tolerance=tolerance,
            description=description, labels=dict(labels or {}),
            files={p: hashlib.sha256(c).hexdigest() for p, c in contents.items()},
        )
    except (ValueError, TypeError) as exc:
        raise PackageError(f"invalid manifest: {exc}") from None
    built = assemble_package(manifest, contents, compress=compress)
    decode_samples(contents[samples_file], in_specs, out_specs)  # the samples must read back against the signature
    return built


class _TensorSpecIn(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    datatype: str
    shape: list[int]


class Spec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The spec file behind `modelcd package build SPEC` (YAML or JSON); paths are relative to the spec file."""

    name: str
    version: str | int | float
    flavor: Flavor | None = None  # inferred from the model file's extension when absent
    model_file: str
    owner: str
    expiry: str | int  # "30d", "12h", "3600s" or seconds
    samples_file: str | None = None  # JSON {"inputs": {...}, "outputs": {...}?}
    sample_inputs: dict[str, Any] | list[Any] | None = None
    expected_outputs: dict[str, Any] | list[Any] | None = None
    inputs: list[_TensorSpecIn] | None = None
    outputs: list[_TensorSpecIn] | None = None
    tolerance: float = 1e-5
    description: str = ""
    labels: dict[str, str] = {}
    trust_pickle: bool = False
    trusted_types: list[str] = []
    compress: bool = False


def build_from_spec(spec_path: str | Path) -> BuiltPackage:
    """Build the package a YAML/JSON spec file describes (see `Spec`); raises `PackageError` naming the problem."""
    import yaml

    spec_path = Path(spec_path)
    try:
        text = spec_path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PackageError(f"cannot read spec {spec_path}: {exc}") from None
    try:
        raw = json.loads(text) if spec_path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise PackageError(f"spec {spec_path.name} is not valid {spec_path.suffix.lstrip('.') or 'YAML'}: {exc}") from None
    try:
        spec = msgspec.convert(raw, Spec)
    except msgspec.ValidationError as exc:
        raise PackageError(f"spec {spec_path.name}: {exc}") from None
    base = spec_path.parent
    sample_inputs: Any = spec.sample_inputs
    expected: Any = spec.expected_outputs
    if spec.samples_file is not None:
        if sample_inputs is not None:
            raise PackageError(f"spec {spec_path.name}: give samples_file or sample_inputs, not both")
        try:
            doc = json.loads((base / spec.samples_file).read_bytes())
        except (OSError, ValueError) as exc:
            raise PackageError(f"spec {spec_path.name}: cannot read samples_file {spec.samples_file}: {exc}") from None
        if not isinstance(doc, dict) or "inputs" not in doc:
            raise PackageError(f'samples_file {spec.samples_file}: expected {{"inputs": ..., "outputs": ...}}')
        sample_inputs = doc["inputs"]
        expected = doc.get("outputs", expected)
    if sample_inputs is None:
        raise PackageError(f"spec {spec_path.name}: sample inputs are mandatory (samples_file or sample_inputs)")

    def specs(items: list[_TensorSpecIn] | None) -> list[TensorSpec] | None:
        if items is None:
            return None
        try:
            return [msgspec.convert(msgspec.to_builtins(i), TensorSpec) for i in items]
        except msgspec.ValidationError as exc:
            raise PackageError(f"spec {spec_path.name}: bad tensor spec: {exc}") from None

    return build_package(
        base / spec.model_file, name=spec.name, version=str(spec.version), owner=spec.owner, expiry=spec.expiry,
        sample_inputs=sample_inputs, expected_outputs=expected, flavor=spec.flavor, inputs=specs(spec.inputs),
        outputs=specs(spec.outputs), tolerance=spec.tolerance, description=spec.description, labels=spec.labels,
        trust_pickle=spec.trust_pickle, trusted_types=spec.trusted_types, compress=spec.compress,
    )
