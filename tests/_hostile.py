"""Hostile model files and packages for the isolation tests: healthy models, then their files edited as an
attacker with only an upload would (skops arrays, XGBoost JSON, LightGBM text), repackaged with valid checksums."""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile
import zipfile
from collections.abc import Callable
from functools import cache
from typing import Any

import msgspec
import numpy as np

from modelcd.runtimes.build import build_package
from modelcd.store.package import BuiltPackage, assemble_package, read_package

from ._ingest import iris


def _fit(kind: str) -> Any:
    x, y = iris()
    if kind == "tree":
        from sklearn.tree import DecisionTreeClassifier

        return DecisionTreeClassifier(random_state=0).fit(x, y)
    if kind == "forest":
        from sklearn.ensemble import RandomForestClassifier

        return RandomForestClassifier(n_estimators=3, max_depth=3, random_state=0).fit(x, y)
    if kind == "hgb":
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(max_iter=3, random_state=0).fit(x, y)
    if kind == "xgboost":
        import xgboost as xgb

        return xgb.XGBClassifier(n_estimators=3, max_depth=3, random_state=0).fit(x, y)
    if kind == "lightgbm":
        import lightgbm as lgb

        return lgb.LGBMClassifier(n_estimators=3, num_leaves=4, min_child_samples=5, verbose=-1).fit(x, y)
    raise ValueError(kind)


@cache
def healthy(kind: str, name: str = "", version: str = "1") -> BuiltPackage:
    """A healthy package of `kind` (tree, forest, hgb, xgboost, lightgbm) on iris, 8 samples."""
    x, _ = iris()
    return build_package(_fit(kind), name=name or f"healthy-{kind}", version=version, owner="ann", expiry="30d",
                         sample_inputs=x[:8])


def with_model(pkg: BuiltPackage, model_bytes: bytes, *, name: str | None = None,
               **manifest_changes: Any) -> BuiltPackage:
    """The package with its model file replaced (checksums recomputed: a valid package around a bad model)."""
    p = read_package(pkg.data)
    contents = dict(p.contents)
    contents[p.manifest.model_file] = model_bytes
    manifest = msgspec.structs.replace(p.manifest, name=name or p.manifest.name, **manifest_changes)
    return assemble_package(manifest, contents)


def model_bytes(pkg: BuiltPackage) -> bytes:
    p = read_package(pkg.data)
    return p.contents[p.manifest.model_file]


# --- skops ---------------------------------------------------------------------------------------------


def _tree_files(schema: Any, module: str, cls: str) -> list[str]:
    found: list[str] = []
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("__module__") == module and node.get("__class__") == cls:
                found.append(node["content"]["content"]["nodes"]["file"])
            stack.extend(v for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend(node)
    return found


def edit_skops_nodes(data: bytes, edit: Callable[[np.ndarray], None], *, predictor: bool = False,
                     which: int = 0) -> bytes:
    """A skops file with the node array of its `which`-th Tree (or TreePredictor) changed by `edit`."""
    src = zipfile.ZipFile(io.BytesIO(data))
    schema = json.loads(src.read("schema.json"))
    module, cls = (("sklearn.ensemble._hist_gradient_boosting.predictor", "TreePredictor") if predictor
                   else ("sklearn.tree._tree", "Tree"))
    target = _tree_files(schema, module, cls)[which]
    arr = np.load(io.BytesIO(src.read(target)), allow_pickle=False)
    edit(arr)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, buf.getvalue() if info.filename == target else src.read(info))
    return out.getvalue()


def unvisited_internal_node(est: Any) -> int:
    """An internal node of a fitted decision tree that none of the 8 sample inputs passes through."""
    x, _ = iris()
    visited = set(est.decision_path(x[:8]).indices.tolist())
    tree = est.tree_
    for node in range(tree.node_count):
        if tree.children_left[node] != -1 and node not in visited:
            return node
    raise AssertionError("every internal node is visited by the samples")


def edited_tree(name: str, how: str) -> BuiltPackage:
    """The decision tree of the finding: `far` sets a child index to 10^9 on a branch the samples do not take,
    `cycle` sets children_left[0] = 0; `feature` splits on feature 10^6."""
    pkg = healthy("tree")
    node = unvisited_internal_node(_fit("tree"))

    def edit(arr: np.ndarray) -> None:
        if how == "far":
            arr["left_child"][node] = 10**9
        elif how == "cycle":
            arr["left_child"][0] = 0
        elif how == "feature":
            arr["feature"][node] = 10**6
        else:
            raise ValueError(how)

    return with_model(pkg, edit_skops_nodes(model_bytes(pkg), edit), name=name)


# --- XGBoost and LightGBM ------------------------------------------------------------------------------


def edited_xgboost(name: str, how: str) -> BuiltPackage:
    pkg = healthy("xgboost")
    doc = json.loads(model_bytes(pkg))
    tree = doc["learner"]["gradient_booster"]["model"]["trees"][-1]
    inner = [i for i, c in enumerate(tree["left_children"]) if c != -1]
    if how == "far":
        tree["right_children"][inner[-1]] = 10**6
    elif how == "cycle":
        tree["left_children"][inner[-1]] = 0
    elif how == "feature":
        tree["split_indices"][inner[-1]] = 4096
    else:
        raise ValueError(how)
    return with_model(pkg, json.dumps(doc).encode(), name=name)


def edited_lightgbm(name: str, how: str) -> BuiltPackage:
    pkg = healthy("lightgbm")
    text = model_bytes(pkg).decode()
    head, _, rest = text.partition("\nTree=1\n")

    def sub(key: str, fn: Callable[[list[str]], None]) -> str:
        lines = rest.split("\n")
        for i, line in enumerate(lines):
            if line.startswith(key + "="):
                values = line.split("=", 1)[1].split()
                fn(values)
                lines[i] = f"{key}={' '.join(values)}"
                break
        return "\n".join(lines)

    if how == "far":
        rest = sub("right_child", lambda v: v.__setitem__(-1, str(-10**6)))
    elif how == "cycle":
        rest = sub("left_child", lambda v: v.__setitem__(len(v) - 1, "0"))
    elif how == "feature":
        rest = sub("split_feature", lambda v: v.__setitem__(0, "4096"))
    else:
        raise ValueError(how)
    return with_model(pkg, f"{head}\nTree=1\n{rest}".encode(), name=name)


# --- archives ---------------------------------------------------------------------------------------------


def gzip_bomb(declared: int, *, stream_zeros: int) -> bytes:
    """A gzip tar whose one member declares `declared` bytes, followed by `stream_zeros` bytes of zeros."""
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz:
        info = tarfile.TarInfo("zeros.bin")
        info.size = declared
        gz.write(info.tobuf(format=tarfile.USTAR_FORMAT))
        block = bytes(16 << 20)
        left = stream_zeros
        while left > 0:
            gz.write(block[:min(left, len(block))])
            left -= len(block)
    return raw.getvalue()


def deep_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def strip_ws(data: bytes) -> bytes:
    return re.sub(rb"\s+", b"", data)


def memory_blowup_onnx() -> bytes:
    """A valid ONNX graph that asks for a 256 GiB tensor when it predicts (a model whose memory is unbounded)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["shape"], ["big"],
                          value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
         helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
         helper.make_node("Add", ["input", "s"], ["variable"])],
        "blowup",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("variable", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [1 << 18, 1 << 18])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()
