"""Structural checks of model files, pure: healthy models of every tree flavor pass, edited ones are refused
naming the tree and node, and nothing is loaded (no model library needed to refuse)."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

from modelcd.runtimes.checks import StructureError, check_model, check_package_models, check_tree
from modelcd.store.package import read_package

from ._hostile import (
    edit_skops_nodes,
    edited_lightgbm,
    edited_tree,
    edited_xgboost,
    healthy,
    model_bytes,
)


def check(pkg_data: bytes) -> str:
    p = read_package(pkg_data)
    return check_package_models(p.manifest, p.contents)


@pytest.mark.parametrize("kind", ["tree", "forest", "hgb", "xgboost", "lightgbm"])
def test_healthy_models_pass(kind: str) -> None:
    """Healthy scikit-learn trees, forests, HistGradientBoosting, XGBoost and LightGBM models pass the checks."""
    summary = check(healthy(kind).data)
    assert "trees" in summary and "nodes checked" in summary, summary


@pytest.mark.parametrize(("how", "words"), [
    ("far", ["1000000000", "outside"]),  # the finding: a child index of 10^9
    ("cycle", ["node 0", "left child 0"]),  # the finding: children_left[0] = 0
    ("feature", ["feature 1000000", "outside 0..3"]),
])
def test_edited_skops_tree_refused(how: str, words: list[str]) -> None:
    """The skops decision tree of the finding, edited (child 10^9, cycle at the root, feature 10^6), is refused."""
    with pytest.raises(StructureError) as info:
        check(edited_tree("edited", how).data)
    assert all(w in info.value.reason for w in words), info.value.reason


@pytest.mark.parametrize("how", ["far", "cycle", "feature"])
def test_edited_xgboost_and_lightgbm_refused(how: str) -> None:
    """XGBoost JSON and LightGBM text with an out-of-range child, a cycle or an out-of-range feature are refused."""
    for pkg in (edited_xgboost("x", how), edited_lightgbm("l", how)):
        with pytest.raises(StructureError) as info:
            check(pkg.data)
        assert "tree" in info.value.reason, info.value.reason


def test_forest_member_and_hist_predictor_edits_refused() -> None:
    """A forest's third tree splitting past n_features, and a HistGradientBoosting predictor cycle, are refused."""
    forest = model_bytes(healthy("forest"))

    def far_feature(arr: np.ndarray) -> None:
        arr["feature"][0] = 4

    with pytest.raises(StructureError, match="feature 4"):
        check_model("sklearn", "model.skops", edit_skops_nodes(forest, far_feature, which=2), n_features=None)

    def loop(arr: np.ndarray) -> None:
        arr["left"][0] = 0

    hgb = model_bytes(healthy("hgb"))
    with pytest.raises(StructureError, match="TreePredictor"):
        check_model("sklearn", "model.skops", edit_skops_nodes(hgb, loop, predictor=True), n_features=4)


def test_detached_cycle_and_shared_child_refused() -> None:
    """A cycle away from the root (unreachable nodes) and a node with two parents are refused by check_tree."""
    # 0 -> (1, 2); 3 <-> 4 detached
    left, right = np.array([1, -1, -1, 4, 3]), np.array([2, -1, -1, 4, 3])
    internal = left != -1
    with pytest.raises(StructureError, match="child of 2 nodes|cannot be reached"):
        check_tree(left, right, internal, np.zeros(5), 4, where="t")
    left, right = np.array([1, 2, -1]), np.array([2, -1, -1])  # node 2 has parents 0 and 1 (a DAG)
    left[1], right[1] = 2, 2
    with pytest.raises(StructureError, match="child of"):
        check_tree(left, right, left != -1, np.zeros(3), 4, where="t")


def test_skops_array_shared_by_id_is_checked_wherever_it_appears() -> None:
    """A malicious node array hidden elsewhere under the tree array's __id__ (what skops' memo would load) is found."""
    data = model_bytes(healthy("tree"))
    src = zipfile.ZipFile(io.BytesIO(data))
    schema = json.loads(src.read("schema.json"))
    nodes_ref = schema["content"]["content"]["tree_"]["content"]["content"]["nodes"]
    arr = np.load(io.BytesIO(src.read(nodes_ref["file"])), allow_pickle=False)
    arr["left_child"][0] = 10**9
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    schema["content"]["content"]["decoy"] = {**nodes_ref, "file": "decoy.npy"}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, json.dumps(schema) if info.filename == "schema.json" else src.read(info))
        dst.writestr("decoy.npy", buf.getvalue())
    with pytest.raises(StructureError, match="outside"):
        check_model("sklearn", "model.skops", out.getvalue(), n_features=4)


@pytest.mark.parametrize(("runtime", "data"), [
    ("sklearn", b"PK\x03\x04 not a zip"),
    ("xgboost", b"\x7b" * 200_000 + b"}" * 200_000),
    ("xgboost", json.dumps({"learner": {"gradient_booster": {"name": "gbtree"}}}).encode()),
    ("lightgbm", b"tree\nversion=v4\n"),
    ("lightgbm", b"\xff\xfe not utf-8"),
])
def test_unreadable_model_files_refused(runtime: str, data: bytes) -> None:
    """A model file that cannot be read as its format (or nests JSON 200,000 deep) is refused: unchecked is unloaded."""
    with pytest.raises(StructureError):
        check_model(runtime, "model", data, n_features=4)


def test_skops_schema_nested_deeply_refused() -> None:
    """A skops schema.json nested 100,000 deep is refused, not a RecursionError."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("schema.json", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(StructureError, match="nested too deeply"):
        check_model("sklearn", "model.skops", out.getvalue(), n_features=4)


def test_pipeline_tree_on_transformed_columns_passes_and_forest_width_bounds_its_trees() -> None:
    """A tree after PolynomialFeatures (15 columns from 4) passes; a forest tree whose own n_features_in_ was
    raised to hide a split on feature 7 is still bounded by the forest's 4."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import PolynomialFeatures
    from sklearn.tree import DecisionTreeClassifier

    from modelcd.runtimes.build import build_package

    from ._ingest import iris

    x, y = iris()
    pipe = make_pipeline(PolynomialFeatures(2), DecisionTreeClassifier(random_state=0)).fit(x, y)
    assert pipe[-1].tree_.feature.max() >= 4  # it does split on a transformed column
    pkg = build_package(pipe, name="poly", version="1", owner="o", expiry="1d", sample_inputs=x[:8])
    assert "trees" in check(pkg.data)

    forest = model_bytes(healthy("forest"))

    def feature(arr: np.ndarray) -> None:
        arr["feature"][0] = 7

    src = zipfile.ZipFile(io.BytesIO(edit_skops_nodes(forest, feature, which=0)))
    schema = json.loads(src.read("schema.json"))
    # Raise every tree's n_features_in_ and Tree n_features to 9; the forest's own stays 4.
    for tree in schema["content"]["content"]["estimators_"]["content"]:
        tree["content"]["content"]["n_features_in_"]["content"] = "9"
        tree["content"]["content"]["tree_"]["__reduce__"]["args"]["content"][0]["content"] = "9"
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, json.dumps(schema) if info.filename == "schema.json" else src.read(info))
    with pytest.raises(StructureError, match="feature 7"):
        check_model("sklearn", "model.skops", out.getvalue(), n_features=None)


def _lightgbm_text_with(edit: str) -> bytes:
    """The healthy LightGBM model with tree 1's left_child turned into a cycle (node 2 -> root), hidden as `edit` says.

    LightGBM reads a tree's KEY=VALUE lines up to its first blank line (the last of a key wins) and splits
    lines at "\\n" only; it loaded the "blank" variant with the cycle (an outside review checked).
    """
    text = model_bytes(healthy("lightgbm")).decode()
    head, _, rest = text.partition("\nTree=1\n")
    head = "\n".join(line for line in head.split("\n") if not line.startswith("tree_sizes="))
    lines = rest.split("\n")
    i = next(i for i, line in enumerate(lines) if line.startswith("left_child="))
    genuine = lines[i]
    values = genuine.split("=", 1)[1].split(" ")
    cyclic = "left_child=" + " ".join([*values[:-1], "0"])
    if edit == "blank":  # the cycle where LightGBM reads, the genuine line after the blank line that ends the tree
        lines[i] = cyclic
        blank = next(k for k in range(i, len(lines)) if lines[k] == "")
        lines.insert(blank + 1, genuine)
    elif edit == "separator":  # one line to LightGBM, two to str.splitlines (the genuine one last)
        lines[i] = cyclic + "\x1c" + genuine
    elif edit == "duplicate":
        lines.insert(i + 1, genuine)
        lines[i] = cyclic
    elif edit == "exponent":  # 0.2e1 is 2 to float(), 0 to a C integer parser
        lines[i] = "left_child=" + " ".join([*values[:-1], "0.2e1"])
    return f"{head}\nTree=1\n" + "\n".join(lines)


@pytest.mark.parametrize("edit", ["blank", "separator", "duplicate", "exponent"])
def test_lightgbm_text_is_read_as_lightgbm_reads_it(edit: str) -> None:
    """A LightGBM cycle hidden where LightGBM reads but the check did not (after a blank line, a \\x1c, a duplicate
    key, an exponent) is refused."""
    data = _lightgbm_text_with(edit).encode()
    with pytest.raises(StructureError) as info:
        check_model("lightgbm", "model.txt", data, n_features=4)
    assert "tree 1" in info.value.reason, info.value.reason
    assert "trees" in check_model("lightgbm", "model.txt", model_bytes(healthy("lightgbm")), n_features=4)
