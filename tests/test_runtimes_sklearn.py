"""The scikit-learn runtime's one-call path: labels taken from predict_proba must equal predict()."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_iris
from sklearn.ensemble import (
    ExtraTreesClassifier,
    GradientBoostingClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

from modelcd.runtimes.build import build_package
from modelcd.runtimes.flavors import load_runtime
from modelcd.store.package import read_package

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # SVC(probability=True), deprecated in 1.9

MODELS = [
    DecisionTreeClassifier(max_depth=4, random_state=0), RandomForestClassifier(n_estimators=15, random_state=0),
    ExtraTreesClassifier(n_estimators=15, random_state=0), GradientBoostingClassifier(n_estimators=15),
    HistGradientBoostingClassifier(max_iter=15), make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)),
    GaussianNB(), KNeighborsClassifier(n_neighbors=4, algorithm="brute"), SVC(probability=True, random_state=0),  # keeps two calls (not in the one-call set)
]


@pytest.mark.parametrize("loader", [load_iris, load_breast_cancer], ids=["3 classes", "2 classes"])
@pytest.mark.parametrize("model", MODELS, ids=lambda m: type(m).__name__ if not hasattr(m, "steps")
                         else "Pipeline")
def test_labels_equal_predict(model: object, loader: object) -> None:
    x, y = loader(return_X_y=True)  # type: ignore[operator]
    x = x.astype(np.float64)
    model.fit(x, y)  # type: ignore[attr-defined]
    pkg = read_package(build_package(model, name="m", version="1", owner="t", expiry="1d",
                                     sample_inputs=x[:5]).data)
    rt = load_runtime(pkg.manifest, pkg.contents)
    # the training rows plus noisy ones around them: ties and boundaries included
    rows = np.vstack([x, x + np.random.default_rng(0).normal(0, x.std(axis=0) * 0.3, x.shape)])
    out = rt.predict({"input": rows})
    np.testing.assert_array_equal(out["label"], model.predict(rows))  # type: ignore[attr-defined]
    np.testing.assert_allclose(out["probabilities"], model.predict_proba(rows))  # type: ignore[attr-defined]
    rt.close()
