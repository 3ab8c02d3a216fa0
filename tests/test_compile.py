"""Compile: sklearn -> ONNX only with proven-equal outputs, the original kept as fallback; otherwise unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_diabetes, load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from modelcd.runtimes.build import build_package
from modelcd.runtimes.compile import COMPILED_FROM_LABEL, CompileResult, compile_package
from modelcd.runtimes.flavors import load_runtime, outputs_match
from modelcd.store.package import BuiltPackage, Package, read_package

IRIS_X, IRIS_Y = load_iris(return_X_y=True)
DIAB_X, DIAB_Y = load_diabetes(return_X_y=True)


class Doubled(LinearRegression):
    """A custom estimator subclass: skl2onnx has no converter registered for it."""

    def predict(self, X):  # type: ignore[no-untyped-def]
        return 2 * super().predict(X)


DOUBLED = f"{Doubled.__module__}.{Doubled.__qualname__}"


def package(model: object, samples: np.ndarray, **kwargs: object) -> Package:
    built = build_package(model, name="m", version="1", owner="o", expiry="1d", sample_inputs=samples, **kwargs)
    return read_package(built.data)


def assert_compiled(result: CompileResult, original: Package) -> Package:
    assert result.compiled, result.reason
    pkg = read_package(result.package.data)
    m = pkg.manifest
    assert (m.flavor, m.runtime, m.model_file) == ("sklearn", "onnx", "model.onnx")
    assert (m.fallback_runtime, m.fallback_model_file) == ("sklearn", original.manifest.model_file)
    assert m.labels[COMPILED_FROM_LABEL] == original.sha256
    assert result.package.sha256 != original.sha256
    assert (m.inputs, m.outputs) == (original.manifest.inputs, original.manifest.outputs)
    samples = pkg.samples()
    for runtime in ("onnx", "sklearn"):  # the compiled model and its fallback both serve the samples
        rt = load_runtime(m, pkg.contents, runtime=runtime)
        assert rt.name == runtime
        assert outputs_match(samples.outputs, rt.predict(samples.inputs), m.tolerance) is None
    return pkg


def assert_unchanged(result: CompileResult, original: Package, *fragments: str) -> None:
    assert not result.compiled
    assert result.package.data == original.data and result.package.sha256 == original.sha256
    for fragment in fragments:
        assert fragment in result.reason, result.reason


def test_classifier_compiles_with_fallback() -> None:
    """A random forest classifier compiles; ONNX label/probabilities equal sklearn's; sklearn kept as fallback."""
    model = RandomForestClassifier(n_estimators=5, max_depth=3, random_state=0).fit(IRIS_X, IRIS_Y)
    original = package(model, IRIS_X[::10])
    assert_compiled(compile_package(original), original)


def test_pipeline_regressor_compiles_with_fallback() -> None:
    """A scaler + linear regression pipeline compiles; the [n, 1] ONNX output is served as sklearn's [n]."""
    model = make_pipeline(StandardScaler(), LinearRegression()).fit(DIAB_X, DIAB_Y)
    original = package(model, DIAB_X[:20])
    pkg = assert_compiled(compile_package(original), original)
    assert pkg.manifest.outputs[0].shape == [-1]


def test_compile_is_deterministic() -> None:
    """Compiling the same package twice gives the same bytes (skl2onnx's random graph name is pinned)."""
    original = package(LogisticRegression(max_iter=500).fit(IRIS_X, IRIS_Y), IRIS_X[::10])
    assert compile_package(original).package.data == compile_package(original).package.data


def test_custom_estimator_falls_back() -> None:
    """A custom estimator subclass skl2onnx cannot convert returns the original package with the reason."""
    original = package(Doubled().fit(DIAB_X, DIAB_Y), DIAB_X[:10], trusted_types=[DOUBLED])
    assert_unchanged(compile_package(original, trusted_types=[DOUBLED]), original, "skl2onnx cannot convert",
                     "Doubled")


def test_function_transformer_pipeline_falls_back() -> None:
    """A pipeline with a FunctionTransformer (arbitrary Python) does not compile; the reason says skl2onnx."""
    model = make_pipeline(FunctionTransformer(np.log1p), LogisticRegression(max_iter=500)).fit(IRIS_X, IRIS_Y)
    original = package(model, IRIS_X[::10])
    assert_unchanged(compile_package(original), original, "skl2onnx cannot convert")


def test_unequal_outputs_fall_back() -> None:
    """With tolerance 0, float32 ONNX differs from float64 sklearn: not compiled, reason names the output."""
    original = package(LinearRegression().fit(DIAB_X, DIAB_Y), DIAB_X[:10], tolerance=0.0)
    assert_unchanged(compile_package(original), original, "differs", "'prediction'", "max abs diff")


def test_untrusted_model_is_not_compiled() -> None:
    """Compile loads the model with the same trust rules as serving: untrusted types stop it, with a reason."""
    original = package(Doubled().fit(DIAB_X, DIAB_Y), DIAB_X[:10], trusted_types=[DOUBLED])
    assert_unchanged(compile_package(original), original, "cannot run the sklearn model", "untrusted")


@pytest.mark.parametrize("kind", ["xgboost", "compiled"])
def test_non_sklearn_runtime_is_left_alone(kind: str) -> None:
    """Packages that are not plain sklearn (another flavor, or already compiled) come back unchanged."""
    if kind == "xgboost":
        import xgboost as xgb

        original = package(xgb.XGBRegressor(n_estimators=2, n_jobs=1).fit(DIAB_X, DIAB_Y), DIAB_X[:5])
        fragment = "no compiler"
    else:
        base = package(LinearRegression().fit(DIAB_X, DIAB_Y), DIAB_X[:5])
        compiled: BuiltPackage = compile_package(base).package
        original = read_package(compiled.data)
        fragment = "already compiled"
    assert_unchanged(compile_package(original), original, fragment)
