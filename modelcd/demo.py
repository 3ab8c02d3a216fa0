"""`modelcd demo`: packages to try the system with, trained on scikit-learn's bundled datasets.

Nothing is downloaded: iris, wine, breast cancer and diabetes ship inside scikit-learn. Two iris versions
(different algorithms, so a shadow or a canary disagrees a little) and one regressor give the
README's walkthrough something real to deploy, shadow, roll out and retire.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelcd.settings import Settings


@dataclass(frozen=True, slots=True)
class DemoModel:
    name: str
    version: str
    dataset: str
    algorithm: str
    description: str


DEMO_MODELS = (
    DemoModel("iris", "1", "iris", "logistic", "iris species, logistic regression"),
    DemoModel("iris", "2", "iris", "forest", "iris species, random forest (the canary / shadow of iris:1)"),
    DemoModel("wine", "1", "wine", "forest", "wine cultivar, random forest"),
    DemoModel("breast-cancer", "1", "breast_cancer", "logistic", "malignant or benign tumour, logistic regression"),
    DemoModel("diabetes", "1", "diabetes", "ridge", "diabetes progression, ridge regression"),
)


def train(model: DemoModel) -> tuple[Any, Any]:
    """(fitted estimator, sample inputs: the first rows of the dataset as float64)."""
    import numpy as np
    from sklearn import datasets
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = {"iris": datasets.load_iris, "wine": datasets.load_wine,
            "breast_cancer": datasets.load_breast_cancer,
            "diabetes": datasets.load_diabetes}[model.dataset](return_X_y=True)
    x = np.asarray(x, dtype=np.float64)
    estimator = {
        "logistic": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)),
        "forest": lambda: RandomForestClassifier(n_estimators=20, max_depth=4, random_state=0),
        "ridge": lambda: Ridge(alpha=1.0),
    }[model.algorithm]()
    estimator.fit(x, y)
    # A spread of rows, not the first few (which are all one class in iris).
    samples = x[:: max(1, len(x) // 8)][:8]
    return estimator, samples


def build_demo(out: Path, *, owner: str = "demo", expiry: str = "30d") -> list[Path]:
    from modelcd.runtimes.build import build_package

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for m in DEMO_MODELS:
        estimator, samples = train(m)
        built = build_package(estimator, name=m.name, version=m.version, owner=owner, expiry=expiry,
                              sample_inputs=samples, description=m.description)
        path = out / f"{m.name}-{m.version}.tar"
        tmp = path.with_suffix(".tar.part")
        tmp.write_bytes(built.data)
        tmp.replace(path)  # never leave a half-written archive under the final name
        written.append(path)
    return written


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="build example packages (iris, wine, breast cancer, diabetes) to try modelcd with",
                       description="Train small scikit-learn models on the datasets bundled with scikit-learn and "
                                   "write one package per model; nothing is downloaded.")
    p.add_argument("--out", type=Path, default=Path("demo-packages"), help="directory (default: ./demo-packages)")
    p.add_argument("--owner", default="demo", help="owner written in each manifest")
    p.add_argument("--expiry", default="30d", help="expiry period of each model, e.g. 30d, 12h, 90s")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from modelcd.errors import CliError
    from modelcd.store.package import PackageError

    try:
        import sklearn  # noqa: F401
    except ModuleNotFoundError:
        raise CliError("the demo needs scikit-learn: pip install 'modelcd[sklearn]'", code=2) from None
    try:
        paths = build_demo(args.out, owner=args.owner, expiry=args.expiry)
    except PackageError as exc:
        raise CliError(f"cannot build the demo packages: {exc}") from None
    for path in paths:
        print(path)
    print(f"\nnext: modelcd deploy {paths[0]}")
    return 0
