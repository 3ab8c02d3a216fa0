"""Model runtimes: the code that turns a package's model file into predictions, for serving and for validation.

Serving nodes and ingest's validation call the same `load_runtime`, so a package that passed validation is served
by exactly the code that validated it.

Invariants:

- A runtime's `predict` takes and returns tensors named by the manifest's signature. Inputs are checked against it
  (names, rank, fixed dimensions, a safe dtype cast) and a misfit raises `InvalidInputError` (a client error,
  never a crash). Outputs are cast and reshaped to the declared specs; a declared output the model does not
  produce raises `PredictionError`. With no declared outputs (used while building a package) every output the
  model produces is returned as is.
- Output names are the same in every flavor: a classifier gives `label` (and `probabilities`, shape [-1, n_classes],
  when it has them), anything else gives `prediction`. ONNX graphs from skl2onnx are mapped onto these names
  (`output_label`/`label` -> `label`, `output_probability`/`probabilities` -> `probabilities`,
  `variable` -> `prediction`). XGBoost and LightGBM boosters do not keep class labels: their `label` is the class
  index, as with their sklearn wrappers trained on 0..k-1.
- Tabular flavors (sklearn, xgboost, lightgbm) take exactly one input tensor, [batch, n_features].
- The sklearn flavor loads skops files and refuses any type outside skops' defaults, `DEFAULT_TRUSTED_TYPES` and
  the caller's `trusted_types`; plain pickle is loaded only with `trust_pickle=True`.
- The model libraries are imported lazily; a missing one raises `MissingExtraError` naming the pip extra.
- `predict` is synchronous and does no I/O; the caller decides whether to run it in a thread.

Errors::

    ModelRuntimeError
    ├── MissingExtraError (also ImportError)     the flavor's library is not installed
    ├── ModelLoadError                           the model file cannot be loaded (corrupt, untrusted, unknown)
    ├── InvalidInputError (also ValueError)      the request does not fit the signature: a 4xx
    └── PredictionError                          the model failed or produced outputs off its signature
"""

from __future__ import annotations

import importlib
import io
import json
import os
import pickle
import sys
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from modelcd.store.package import DATATYPES, TensorSpec

if TYPE_CHECKING:
    from types import ModuleType

    from modelcd.store.package import Manifest

__all__ = [
    "DEFAULT_TRUSTED_TYPES",
    "InvalidInputError",
    "MissingExtraError",
    "ModelLoadError",
    "ModelRuntimeError",
    "PredictionError",
    "Runtime",
    "SerializedModel",
    "create_runtime",
    "load_runtime",
    "outputs_match",
    "serialize_model",
]

Array = npt.NDArray[Any]


class ModelRuntimeError(Exception):
    """Root of the runtime errors."""


class MissingExtraError(ModelRuntimeError, ImportError):
    """The library a flavor needs is not installed."""


class ModelLoadError(ModelRuntimeError):
    """The model file cannot be loaded: corrupt, of an unknown format, or holding untrusted types."""


class InvalidInputError(ModelRuntimeError, ValueError):
    """The inputs do not fit the model's signature (the client's fault)."""


class PredictionError(ModelRuntimeError):
    """The model failed to predict, or produced outputs that do not fit its signature."""


#: Types skops does not trust by default but that plain scikit-learn models are made of.
DEFAULT_TRUSTED_TYPES: Final[frozenset[str]] = frozenset({
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper",
    "sklearn._loss.link.IdentityLink",
    "sklearn._loss.link.LogitLink",
    "sklearn._loss.link.MultinomialLogit",
    "sklearn._loss.loss.HalfSquaredError",
    "sklearn._loss.loss.HalfBinomialLoss",
    "sklearn._loss.loss.HalfMultinomialLoss",
    "sklearn._loss.loss.AbsoluteError",
    "sklearn._loss.loss.HalfPoissonLoss",
    "sklearn._loss.loss.PinballLoss",
    "sklearn._loss.loss.HuberLoss",
    "sklearn._loss.loss.ExponentialLoss",
})

_EXTRAS: Final = {"sklearn": ("sklearn", "sklearn"), "skops": ("skops.io", "sklearn"),
                  "onnx": ("onnxruntime", "onnx"), "xgboost": ("xgboost", "xgboost"),
                  "lightgbm": ("lightgbm", "lightgbm")}
_PICKLE_SUFFIXES: Final = (".pkl", ".pickle", ".joblib")


def _require(module: str, extra: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(f"{module} is not installed; install it with: pip install 'modelcd[{extra}]' "
                                f"({exc})") from None


@runtime_checkable
class Runtime(Protocol):
    """A loaded model. `predict` is synchronous and may be called from one thread at a time or several."""

    name: str

    def predict(self, inputs: Mapping[str, Any]) -> dict[str, Array]: ...

    def close(self) -> None: ...


class _BaseRuntime:
    name: ClassVar[str]

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self._closed = False

    def predict(self, inputs: Mapping[str, Any]) -> dict[str, Array]:
        if self._closed:
            raise ModelRuntimeError(f"{self.name} runtime is closed")
        arrays = _check_inputs(inputs, self.inputs)
        try:
            raw = self._predict(arrays)
        except ModelRuntimeError:
            raise
        except Exception as exc:  # the model library's own errors: report, never crash the caller
            raise PredictionError(f"{self.name} model failed to predict: {type(exc).__name__}: {exc}") from exc
        return _conform_outputs(raw, self.outputs, batch=_batch_size(arrays))

    def close(self) -> None:
        self._closed = True

    def _predict(self, inputs: dict[str, Array]) -> dict[str, Array]:
        raise NotImplementedError

    def _single_input(self, inputs: dict[str, Array]) -> Array:
        x = inputs[self.inputs[0].name]
        if x.ndim != 2:
            raise InvalidInputError(f"input {self.inputs[0].name!r} must be 2-D [batch, features], "
                                    f"got shape {list(x.shape)}")
        return x


def _batch_size(arrays: Mapping[str, Array]) -> int | None:
    for arr in arrays.values():
        return int(arr.shape[0]) if arr.ndim else None
    return None


def _check_inputs(inputs: Mapping[str, Any], specs: Sequence[TensorSpec]) -> dict[str, Array]:
    unknown = sorted(set(inputs) - {s.name for s in specs})
    if unknown:
        raise InvalidInputError(f"unknown inputs {unknown}; the model takes {[s.name for s in specs]}")
    out: dict[str, Array] = {}
    for spec in specs:
        if spec.name not in inputs:
            raise InvalidInputError(f"missing input {spec.name!r}")
        dtype = DATATYPES[spec.datatype]
        try:
            arr = np.asarray(inputs[spec.name])
            if dtype.kind == "O":
                arr = arr.astype(object)
            elif arr.dtype != dtype:
                if not np.can_cast(arr.dtype, dtype, casting="same_kind"):
                    raise InvalidInputError(f"input {spec.name!r}: cannot use {arr.dtype} data as {spec.datatype}")
                arr = arr.astype(dtype)
        except (ValueError, TypeError) as exc:
            raise InvalidInputError(f"input {spec.name!r} is not a {spec.datatype} tensor: {exc}") from None
        if arr.ndim != len(spec.shape) or any(d not in (-1, a) for a, d in zip(arr.shape, spec.shape, strict=True)):
            raise InvalidInputError(f"input {spec.name!r} has shape {list(arr.shape)}, expected {spec.shape} "
                                    "(-1: any size)")
        out[spec.name] = arr
    if len({a.shape[0] for a in out.values() if a.ndim}) > 1:
        raise InvalidInputError("inputs disagree on the batch size")
    return out


def _conform_outputs(raw: Mapping[str, Any], specs: Sequence[TensorSpec], *, batch: int | None) -> dict[str, Array]:
    if not specs:
        result = {}
        for name, value in raw.items():
            arr = np.asarray(value)
            result[name] = arr.astype(object) if arr.dtype.kind in "US" else arr
        return result
    out: dict[str, Array] = {}
    for spec in specs:
        if spec.name not in raw:
            raise PredictionError(f"the model produced no output {spec.name!r} (it produced {sorted(raw)})")
        arr = np.asarray(raw[spec.name])
        if arr.ndim != len(spec.shape):
            # e.g. skl2onnx regressors give [n, 1] where sklearn gives [n]
            target = [batch if d == -1 and i == 0 and batch is not None else d for i, d in enumerate(spec.shape)]
            try:
                arr = arr.reshape(target)
            except ValueError:
                raise PredictionError(f"output {spec.name!r} has shape {list(arr.shape)}, "
                                      f"the signature says {spec.shape}") from None
        dtype = DATATYPES[spec.datatype]
        out[spec.name] = arr.astype(dtype, copy=False)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Flavors


def _is_classifier(model: Any) -> bool:
    return getattr(model, "_estimator_type", None) == "classifier" or (
        hasattr(model, "__sklearn_tags__") and getattr(model.__sklearn_tags__(), "estimator_type", None)
        == "classifier")


# Classifiers whose predict() is classes_[argmax(predict_proba())] by construction: for them one
# predict_proba call gives both outputs. scikit-learn validates the input on every call (since 1.6
# through narwhals' dataframe checks), which is most of the cost of a small model, so this halves it.
# Absent on purpose: SVC (Platt-scaled probabilities may disagree with predict); KNeighbors matched in
# tests/test_runtimes_sklearn.py but its vote is not argmax by contract, so it keeps the two calls.
_LABELS_FROM_PROBA: Final = frozenset({
    "DecisionTreeClassifier", "ExtraTreeClassifier", "RandomForestClassifier", "ExtraTreesClassifier",
    "GradientBoostingClassifier", "HistGradientBoostingClassifier", "LogisticRegression", "GaussianNB",
    "MultinomialNB", "BernoulliNB", "ComplementNB",
})


def _final_estimator(model: Any) -> Any:
    steps = getattr(model, "steps", None)  # a Pipeline answers with its last step's classes
    return steps[-1][1] if steps else model


class SklearnRuntime(_BaseRuntime):
    name = "sklearn"

    def __init__(self, model_bytes: bytes, *, model_file: str, inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec], trust_pickle: bool, trusted_types: Iterable[str]) -> None:
        super().__init__(inputs, outputs)
        _require("sklearn", "sklearn")
        if model_file.endswith(_PICKLE_SUFFIXES):
            if not trust_pickle:
                raise ModelLoadError(f"{model_file} is a pickle, which can run arbitrary code when loaded; "
                                     "it is loaded only with trust_pickle=True (use skops instead)")
            try:
                self.model = pickle.loads(model_bytes)  # noqa: S301 -- the operator explicitly trusts this file
            except Exception as exc:
                raise ModelLoadError(f"cannot unpickle {model_file}: {type(exc).__name__}: {exc}") from None
        else:
            sio = _require("skops.io", "sklearn")
            try:
                untrusted = sio.get_untrusted_types(data=model_bytes)
            except Exception as exc:
                raise ModelLoadError(f"{model_file} is not a skops file: {type(exc).__name__}: {exc}") from None
            allowed = DEFAULT_TRUSTED_TYPES | frozenset(trusted_types)
            refused = sorted(t for t in untrusted if t not in allowed)
            if refused:
                raise ModelLoadError(f"{model_file} holds untrusted types {refused}; pass them as trusted_types "
                                     "if you trust them")
            try:
                self.model = sio.loads(model_bytes, trusted=sorted(untrusted))
            except Exception as exc:
                raise ModelLoadError(f"cannot load {model_file}: {type(exc).__name__}: {exc}") from None
        if not hasattr(self.model, "predict"):
            raise ModelLoadError(f"{model_file} holds a {type(self.model).__name__}, which has no predict()")
        self._classifier = _is_classifier(self.model)
        self._proba = self._classifier and hasattr(self.model, "predict_proba")
        self._labels_from_proba = (self._proba and type(_final_estimator(self.model)).__name__ in _LABELS_FROM_PROBA
                                   and hasattr(self.model, "classes_"))

    def _predict(self, inputs: dict[str, Array]) -> dict[str, Array]:
        x = self._single_input(inputs)
        if not self._classifier:
            return {"prediction": self.model.predict(x)}
        if self._labels_from_proba:
            proba = self.model.predict_proba(x)
            if isinstance(proba, np.ndarray) and proba.ndim == 2:
                return {"label": self.model.classes_.take(proba.argmax(axis=1)), "probabilities": proba}
            return {"label": self.model.predict(x), "probabilities": proba}  # multi-output: a list of arrays
        out = {"label": self.model.predict(x)}
        if self._proba:
            out["probabilities"] = self.model.predict_proba(x)
        return out


_ONNX_TYPES: Final = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
                      "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
                      "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
                      "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_, "tensor(float16)": np.float16,
                      "tensor(string)": object}
_ONNX_ALIASES: Final = {"output_label": "label", "output_probability": "probabilities", "variable": "prediction"}


class OnnxRuntime(_BaseRuntime):
    name = "onnx"

    def __init__(self, model_bytes: bytes, *, model_file: str, inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec], intra_op_threads: int) -> None:
        super().__init__(inputs, outputs)
        ort = _require("onnxruntime", "onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # One small model per process: ONNX Runtime's arena and memory patterns keep buffers sized for the
        # largest run around for the session's life (tens of MiB per worker), and its idle threads spin.
        opts.enable_cpu_mem_arena = False
        opts.enable_mem_pattern = False
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelLoadError(f"cannot load {model_file} into onnxruntime: {type(exc).__name__}: {exc}") from None
        sess_inputs = self.session.get_inputs()
        by_name = {i.name: i for i in sess_inputs}
        self._feeds: list[tuple[str, str, Any]] = []  # (signature name, session name, numpy dtype)
        for i, spec in enumerate(self.inputs):
            node = by_name.get(spec.name)
            if node is None and len(sess_inputs) == len(self.inputs) == 1:
                node = sess_inputs[0]
            if node is None:
                raise ModelLoadError(f"{model_file} has no input {spec.name!r} (it has {sorted(by_name)})")
            self._feeds.append((spec.name, node.name, _ONNX_TYPES.get(node.type)))
        names = [o.name for o in self.session.get_outputs()]
        self._outputs = [(n, n if n not in _ONNX_ALIASES or _ONNX_ALIASES[n] in names else _ONNX_ALIASES[n])
                         for n in names]

    def _predict(self, inputs: dict[str, Array]) -> dict[str, Array]:
        feed = {}
        for sig_name, node_name, dtype in self._feeds:
            arr = inputs[sig_name]
            feed[node_name] = arr if dtype is None or arr.dtype == dtype else arr.astype(dtype)
        results = self.session.run([n for n, _ in self._outputs], feed)
        out: dict[str, Array] = {}
        for (onnx_name, name), value in zip(self._outputs, results, strict=True):
            if not isinstance(value, np.ndarray):
                raise PredictionError(f"ONNX output {onnx_name!r} is a {type(value).__name__}, not a tensor "
                                      "(convert sklearn classifiers with options={'zipmap': False})")
            out[name] = value
        return out

    def close(self) -> None:
        super().close()
        self.session = None


class XGBoostRuntime(_BaseRuntime):
    name = "xgboost"

    def __init__(self, model_bytes: bytes, *, model_file: str, inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec], intra_op_threads: int) -> None:
        super().__init__(inputs, outputs)
        xgb = _require("xgboost", "xgboost")
        try:
            self.booster = xgb.Booster(params={"nthread": intra_op_threads})
            self.booster.load_model(bytearray(model_bytes))
            self.objective = json.loads(self.booster.save_config())["learner"]["objective"]["name"]
        except Exception as exc:
            raise ModelLoadError(f"cannot load {model_file} as an XGBoost model: {type(exc).__name__}: {exc}") from None

    def _predict(self, inputs: dict[str, Array]) -> dict[str, Array]:
        pred = np.asarray(self.booster.inplace_predict(self._single_input(inputs)))
        return _classify(self.objective, pred, binary={"binary:logistic"}, multi={"multi:softprob"},
                         labels={"multi:softmax", "binary:hinge"})


class LightGBMRuntime(_BaseRuntime):
    name = "lightgbm"

    def __init__(self, model_bytes: bytes, *, model_file: str, inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec], intra_op_threads: int) -> None:
        super().__init__(inputs, outputs)
        lgb = _require("lightgbm", "lightgbm")
        try:
            text = model_bytes.decode()
            self.booster = lgb.Booster(model_str=text)
        except Exception as exc:
            raise ModelLoadError(f"cannot load {model_file} as a LightGBM model: {type(exc).__name__}: {exc}") from None
        self.objective = next((line.split("=", 1)[1].split()[0] for line in text.splitlines()
                               if line.startswith("objective=")), "")
        self._threads = intra_op_threads

    def _predict(self, inputs: dict[str, Array]) -> dict[str, Array]:
        pred = np.asarray(self.booster.predict(self._single_input(inputs), num_threads=self._threads))
        return _classify(self.objective, pred, binary={"binary"}, multi={"multiclass", "softmax", "multiclassova",
                                                                          "multiclass_ova", "ova", "ovr"}, labels=set())


def _classify(objective: str, pred: Array, *, binary: set[str], multi: set[str], labels: set[str]) -> dict[str, Array]:
    if objective in binary:
        return {"label": (pred > 0.5).astype(np.int64), "probabilities": np.stack([1.0 - pred, pred], axis=1)}
    if objective in multi:
        return {"label": np.argmax(pred, axis=1).astype(np.int64), "probabilities": pred}
    if objective in labels:
        return {"label": pred.astype(np.int64)}
    return {"prediction": pred}


# ---------------------------------------------------------------------------------------------------------------
# Entry points


def create_runtime(runtime: str, model: bytes, *, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec] = (),
                   model_file: str = "", trust_pickle: bool = False, trusted_types: Iterable[str] = (),
                   intra_op_threads: int = 1) -> Runtime:
    """Load `model` (a model file's bytes) into the named runtime. `model_file` picks the format (skops vs pickle)
    and names the file in errors. Raises `MissingExtraError` or `ModelLoadError`."""
    if not inputs:
        raise ModelLoadError("the signature names no inputs")
    if runtime in ("sklearn", "xgboost", "lightgbm") and len(inputs) != 1:
        raise ModelLoadError(f"a {runtime} model takes exactly one input tensor [batch, features], "
                             f"the signature names {[s.name for s in inputs]}")
    model_file = model_file or f"the {runtime} model"
    if runtime == "sklearn":
        return SklearnRuntime(model, model_file=model_file, inputs=inputs, outputs=outputs,
                              trust_pickle=trust_pickle, trusted_types=trusted_types)
    if runtime == "onnx":
        return OnnxRuntime(model, model_file=model_file, inputs=inputs, outputs=outputs,
                           intra_op_threads=intra_op_threads)
    if runtime == "xgboost":
        return XGBoostRuntime(model, model_file=model_file, inputs=inputs, outputs=outputs,
                              intra_op_threads=intra_op_threads)
    if runtime == "lightgbm":
        return LightGBMRuntime(model, model_file=model_file, inputs=inputs, outputs=outputs,
                               intra_op_threads=intra_op_threads)
    raise ModelLoadError(f"unknown runtime {runtime!r} (known: sklearn, onnx, xgboost, lightgbm)")


def load_runtime(manifest: Manifest, files: Mapping[str, bytes] | str | os.PathLike[str], *,
                 runtime: str | None = None, trust_pickle: bool = False, trusted_types: Iterable[str] = (),
                 intra_op_threads: int = 1) -> Runtime:
    """Load a package's model: `files` is `Package.contents` (path -> bytes) or a directory it was extracted to.

    `runtime` None or `manifest.runtime` loads `manifest.model_file`; `manifest.fallback_runtime` loads the
    fallback model file (e.g. the original sklearn model of a compiled package).
    """
    if runtime is None or runtime == manifest.runtime:
        runtime, model_file = manifest.runtime, manifest.model_file
    elif runtime == manifest.fallback_runtime and manifest.fallback_model_file is not None:
        model_file = manifest.fallback_model_file
    else:
        raise ModelLoadError(f"package {manifest.name}:{manifest.version} has no model for runtime {runtime!r} "
                             f"(it has {manifest.runtime!r}"
                             + (f" and fallback {manifest.fallback_runtime!r})" if manifest.fallback_runtime else ")"))
    if isinstance(files, Mapping):
        if model_file not in files:
            raise ModelLoadError(f"model file {model_file!r} not found in the package files")
        data = files[model_file]
    else:
        try:
            data = (Path(files) / model_file).read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"cannot read model file {model_file!r}: {exc}") from None
    rt = create_runtime(runtime, data, inputs=manifest.inputs, outputs=manifest.outputs, model_file=model_file,
                        trust_pickle=trust_pickle, trusted_types=trusted_types, intra_op_threads=intra_op_threads)
    if os.environ.get(PERTURB_ENV) == runtime:
        return _Perturbed(rt)
    return rt


# Test-only (tests/test_release_canary.py): MODELCD_TEST_PERTURB_RUNTIME=<runtime> shifts that runtime's float
# outputs, as a release that changed a model's numerics would. Never set it in production.
PERTURB_ENV = "MODELCD_TEST_PERTURB_RUNTIME"


class _Perturbed:
    def __init__(self, inner: Runtime) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def predict(self, inputs: Mapping[str, Any]) -> dict[str, Array]:
        out = self._inner.predict(inputs)
        return {k: v + 0.25 if np.issubdtype(np.asarray(v).dtype, np.floating) else v for k, v in out.items()}


def outputs_match(expected: Mapping[str, Any], actual: Mapping[str, Any], tolerance: float) -> str | None:
    """None if every expected output is in `actual` with the same shape and values, else the first difference.

    Floats compare with `|actual - expected| <= tolerance * (1 + |expected|)` (numpy.isclose with rtol = atol
    = tolerance); integers, booleans and strings compare exactly.
    """
    for name in expected:
        if name not in actual:
            return f"output {name!r} is missing (got {sorted(actual)})"
        e, a = np.asarray(expected[name]), np.asarray(actual[name])
        if e.shape != a.shape:
            return f"output {name!r} has shape {list(a.shape)}, expected {list(e.shape)}"
        if e.size == 0:
            continue
        if e.dtype.kind in "fc" or a.dtype.kind in "fc":
            try:
                ef, af = e.astype(np.float64), a.astype(np.float64)
            except (ValueError, TypeError):
                return f"output {name!r}: cannot compare {a.dtype} values with expected {e.dtype} values"
            bad = ~np.isclose(af, ef, rtol=tolerance, atol=tolerance, equal_nan=True)
            if bad.any():
                diff = np.abs(af - ef)
                idx = np.unravel_index(int(np.nanargmax(np.where(bad, diff, -1.0))), diff.shape)
                return (f"output {name!r}: {int(bad.sum())} of {e.size} values differ beyond tolerance {tolerance} "
                        f"(max abs diff {float(diff[idx]):.6g} at index {list(map(int, idx))}: "
                        f"expected {ef[idx].item()!r}, got {af[idx].item()!r})")
        else:
            bad = np.asarray(e != a)
            if bad.any():
                idx = tuple(int(i) for i in np.argwhere(bad)[0])
                return (f"output {name!r}: {int(bad.sum())} of {e.size} values differ (first at index {list(idx)}: "
                        f"expected {_plain(e[idx])!r}, got {_plain(a[idx])!r})")
    return None


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds, so messages say `0`, not `np.int64(0)`."""
    return value.item() if isinstance(value, np.generic) else value


# ---------------------------------------------------------------------------------------------------------------
# Serialization (used by package building)


@dataclass(frozen=True, slots=True)
class SerializedModel:
    """A model in its flavor's safe file format."""

    flavor: str
    model_file: str  # the file name to store it under
    data: bytes


def _root_module(obj: object) -> str:
    return type(obj).__module__.split(".", 1)[0]


def serialize_model(model: object, *, flavor: str | None = None, trust_pickle: bool = False) -> SerializedModel:
    """Serialize a model object, or read a model file, into its flavor's safe format.

    Objects: sklearn estimators (-> skops), xgboost Booster/XGBModel (-> JSON), lightgbm Booster/LGBMModel
    (-> model text), onnx ModelProto or raw ONNX bytes. Paths: .skops, .onnx, .json/.ubj (xgboost), .txt
    (lightgbm, or any extension with `flavor`), and .pkl/.pickle/.joblib sklearn pickles, loaded only with
    `trust_pickle=True` and re-saved as skops. Raises `ModelLoadError` (or `MissingExtraError`).
    """
    if isinstance(model, (str, os.PathLike)):
        return _serialize_path(Path(model), flavor=flavor, trust_pickle=trust_pickle)
    if isinstance(model, (bytes, bytearray, memoryview)):
        if flavor not in (None, "onnx"):
            raise ModelLoadError(f"raw bytes are taken as an ONNX model; for {flavor} pass the object or a file path")
        return SerializedModel("onnx", "model.onnx", bytes(model))
    root = _root_module(model)
    if root == "onnx" or type(model).__name__ == "ModelProto":
        return SerializedModel("onnx", "model.onnx", model.SerializeToString())  # type: ignore[attr-defined]
    if root == "xgboost":
        booster = model.get_booster() if hasattr(model, "get_booster") else model  # type: ignore[attr-defined]
        return SerializedModel("xgboost", "model.json", bytes(booster.save_raw(raw_format="json")))
    if root == "lightgbm":
        booster = getattr(model, "booster_", model)
        return SerializedModel("lightgbm", "model.txt", booster.model_to_string().encode())
    sklearn_base = sys.modules.get("sklearn.base")
    if (sklearn_base is not None and isinstance(model, sklearn_base.BaseEstimator)) or hasattr(model, "predict"):
        sio = _require("skops.io", "sklearn")
        try:
            return SerializedModel("sklearn", "model.skops", canonical_skops(sio.dumps(model)))
        except Exception as exc:
            raise ModelLoadError(f"cannot save {type(model).__name__} with skops: {type(exc).__name__}: {exc}") from None
    raise ModelLoadError(f"cannot tell the flavor of a {type(model).__module__}.{type(model).__name__}; pass an "
                         "sklearn estimator, an xgboost or lightgbm model, an onnx ModelProto or a model file path")


_ZIP_EPOCH: Final = (1980, 1, 1, 0, 0, 0)


def canonical_skops(data: bytes) -> bytes:
    """Rewrite a skops file so the same model always gives the same bytes.

    skops names its array files and `__id__` fields after `id()` of the objects (memory addresses) and stamps zip
    entries with the current time. This renumbers the ids in order of first appearance in schema.json (keeping
    which nodes share an id), renames the files to match, sorts the entries and fixes their timestamps.
    """
    src = zipfile.ZipFile(io.BytesIO(data))
    schema = json.loads(src.read("schema.json"))
    ids: dict[str, str] = {}

    def new_id(old: object) -> str:
        return ids.setdefault(str(old), str(len(ids) + 1))

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "__id__" and isinstance(value, int):
                    # Immutable JSON values are written in full wherever they occur; whether two of them share an
                    # id only depends on interning, so give each its own. Other nodes keep their sharing.
                    out[key] = len(ids) + 1 if node.get("__loader__") == "JsonNode" else int(new_id(value))
                    if node.get("__loader__") == "JsonNode":
                        ids[f"json-{len(ids)}"] = str(len(ids) + 1)
                elif key == "file" and isinstance(value, str) and value.split(".", 1)[0].isdigit():
                    stem, _, ext = value.partition(".")
                    out[key] = f"{new_id(stem)}.{ext}"
                else:
                    out[key] = walk(value)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    entries = {"schema.json": json.dumps(walk(schema), indent=2, sort_keys=True).encode()}
    for info in src.infolist():
        if info.filename == "schema.json":
            continue
        stem, _, ext = info.filename.partition(".")
        name = f"{new_id(stem)}.{ext}" if stem.isdigit() else info.filename
        entries[name] = src.read(info)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as dst:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            dst.writestr(info, entries[name])
    return buf.getvalue()


def _serialize_path(path: Path, *, flavor: str | None, trust_pickle: bool) -> SerializedModel:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc}") from None
    suffix = path.suffix.lower()
    if flavor is None:
        flavor = {".skops": "sklearn", ".pkl": "sklearn", ".pickle": "sklearn", ".joblib": "sklearn",
                  ".onnx": "onnx", ".json": "xgboost", ".ubj": "xgboost", ".txt": "lightgbm"}.get(suffix)
        if flavor is None:
            raise ModelLoadError(f"cannot tell the flavor of {path.name} from its extension; give the flavor")
    if flavor == "sklearn":
        if suffix in _PICKLE_SUFFIXES:
            if not trust_pickle:
                raise ModelLoadError(f"{path.name} is a pickle, which can run arbitrary code when loaded; "
                                     "it is read only with trust_pickle=True (or save the model with skops)")
            if suffix == ".joblib":
                model = _require("joblib", "sklearn").load(io.BytesIO(data))
            else:
                model = pickle.loads(data)  # noqa: S301 -- the operator explicitly trusts this file
            return serialize_model(model, flavor="sklearn")
        try:
            return SerializedModel("sklearn", "model.skops", canonical_skops(data))
        except (ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise ModelLoadError(f"{path.name} is not a skops file: {type(exc).__name__}: {exc}") from None
    if flavor == "onnx":
        return SerializedModel("onnx", "model.onnx", data)
    if flavor == "xgboost":
        if suffix != ".json":
            xgb = _require("xgboost", "xgboost")
            booster = xgb.Booster()
            try:
                booster.load_model(bytearray(data))
            except Exception as exc:
                raise ModelLoadError(f"cannot load {path.name} as an XGBoost model: {exc}") from None
            data = bytes(booster.save_raw(raw_format="json"))
        return SerializedModel("xgboost", "model.json", data)
    if flavor == "lightgbm":
        return SerializedModel("lightgbm", "model.txt", data)
    raise ModelLoadError(f"unknown flavor {flavor!r} (known: sklearn, onnx, xgboost, lightgbm)")
