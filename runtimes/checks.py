"""Structural checks of model files, before any model library loads them: defence in depth.

A tree model is arrays of child and feature indices that native code follows without bounds checks: an
index out of range reads (or writes) outside the arrays and a cycle never ends. Model libraries trust
their own files; these checks do not. They read the file as data (skops' zip of JSON and `.npy` arrays,
XGBoost's JSON, LightGBM's text) and never import, unpickle or run anything of the model.

What is checked, per tree: every child index of an internal node is in range and not the root, no node
has two parents, every node is reachable from the root (so there is no cycle, and no walk revisits a
node), and every split feature is in range (below the tree's own number of features and every enclosing
estimator's `n_features_in_`, or the signature's width when none says; XGBoost and LightGBM: the
model's and the signature's). scikit-learn (skops): `sklearn.tree._tree.Tree` (decision trees, forests, gradient
boosting, isolation forests) and HistGradientBoosting's `TreePredictor`; XGBoost: every tree of a
`gbtree` / `dart` booster; LightGBM: every tree of the model text, read as LightGBM reads it (lines end
at a line feed only, a tree's fields at its first blank line; a repeated key, a field past that line or a
non-integer index is refused, so the check never reads a value LightGBM would not). A file that cannot
be read as its format says is refused too: what cannot be checked is not loaded. ONNX has no tree indices to check here
(onnxruntime checks its tree ensembles at session creation); a pickle is not checked (it runs code when
loaded: trusting it is the operator's explicit choice).

Invariants: pure (bytes in, a summary or a `StructureError` out), no model library imported, iterative
(a deep or cyclic structure cannot exhaust the stack), and linear in the size of the model.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from modelcd.store.package import Manifest

__all__ = ["StructureError", "check_model", "check_package_models", "check_tree"]

Array = npt.NDArray[Any]
_PICKLE_SUFFIXES: Final = (".pkl", ".pickle", ".joblib")


class StructureError(ValueError):
    """A model file whose structure is unsafe to load or cannot be checked; `reason` says where and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- the tree check itself ---------------------------------------------------------------------------------


def check_tree(left: Array, right: Array, internal: Array, feature: Array, n_features: int | None, *,
               where: str, allowed_orphans: int = 0) -> None:
    """Check one binary tree given as arrays over its nodes (node 0 is the root).

    `internal` marks the nodes that split (their `left`/`right` are node indices and `feature` a column);
    the other nodes are leaves and their children and features are ignored. Raises `StructureError`.
    """
    n = len(internal)
    if n == 0:
        raise StructureError(f"{where}: a tree with no nodes")
    if not (len(left) == len(right) == len(feature) == n):
        raise StructureError(f"{where}: node arrays of different lengths ({len(left)}, {len(right)}, "
                             f"{len(feature)}, {n})")
    internal = np.asarray(internal, dtype=bool)
    lo, ro = np.asarray(left, dtype=np.int64)[internal], np.asarray(right, dtype=np.int64)[internal]
    nodes = np.flatnonzero(internal)
    for side, kids in (("left", lo), ("right", ro)):
        bad = (kids < 1) | (kids >= n)
        if bad.any():
            i = int(np.argmax(bad))
            raise StructureError(f"{where}: node {int(nodes[i])} has {side} child {int(kids[i])}, outside 1..{n - 1} "
                                 "(an out-of-range or root child index: the file was edited or is corrupt)")
    children = np.concatenate([lo, ro])
    parents = np.bincount(children, minlength=n)
    if (parents > 1).any():
        node = int(np.argmax(parents > 1))
        raise StructureError(f"{where}: node {node} is the child of {int(parents[node])} nodes (a cycle or a "
                             "shared subtree: a tree walk would revisit it)")
    # Each node has at most one parent and the root none, so the walk from the root visits each node once.
    seen = 1
    frontier = np.zeros(1, dtype=np.int64)
    left64, right64 = np.asarray(left, dtype=np.int64), np.asarray(right, dtype=np.int64)
    while frontier.size:
        splits = frontier[internal[frontier]]
        frontier = np.concatenate([left64[splits], right64[splits]])
        seen += frontier.size
    if n - seen > allowed_orphans:
        raise StructureError(f"{where}: {n - seen} of {n} nodes cannot be reached from the root (a cycle detached "
                             "from the tree, or a corrupt file)")
    if n_features is not None and nodes.size:
        feats = np.asarray(feature, dtype=np.int64)[internal]
        bad = (feats < 0) | (feats >= n_features)
        if bad.any():
            i = int(np.argmax(bad))
            raise StructureError(f"{where}: node {int(nodes[i])} splits on feature {int(feats[i])}, outside "
                                 f"0..{n_features - 1}")


def _min_features(*bounds: int | None) -> int | None:
    known = [b for b in bounds if b is not None]
    return min(known) if known else None


# --- scikit-learn through skops -------------------------------------------------------------------------------


def _json_int(node: Any) -> int | None:
    """The int a skops JsonNode holds, or None."""
    if isinstance(node, dict) and node.get("__loader__") == "JsonNode":
        try:
            value = json.loads(node.get("content", ""))
        except (ValueError, TypeError, RecursionError):
            return None
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    return None


def _walk(schema: Any) -> Iterator[tuple[dict[str, Any], int | None]]:
    """Every dict node of a skops schema, with the smallest `n_features_in_` of the estimators enclosing it
    (iterative). The smallest, not the nearest: a forest checks its input's width and hands it to its trees
    unchecked, so a tree's own (editable) `n_features_in_` proves nothing about the array it will index."""
    stack: list[tuple[Any, int | None]] = [(schema, None)]
    while stack:
        node, n_in = stack.pop()
        if isinstance(node, dict):
            content = node.get("content")
            if isinstance(content, dict) and isinstance(content.get("content"), dict):
                n_in = _min_features(n_in, _json_int(content["content"].get("n_features_in_")))
            yield node, n_in
            stack.extend((v, n_in) for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend((v, n_in) for v in node if isinstance(v, dict | list))


class _Skops:
    """A skops file read as data: its schema, and its `.npy` arrays loaded without pickle."""

    def __init__(self, data: bytes, where: str) -> None:
        self.where = where
        try:
            self.zip = zipfile.ZipFile(io.BytesIO(data))
            self.schema = json.loads(self.zip.read("schema.json"))
        except RecursionError:
            raise StructureError(f"{where}: schema.json nested too deeply") from None
        except (zipfile.BadZipFile, KeyError, ValueError, UnicodeDecodeError, OSError) as exc:
            raise StructureError(f"{where}: not a skops file ({type(exc).__name__}: {exc})") from None
        # skops loads an object once per `__id__` and hands the same object wherever the id appears again:
        # any file under a node's id may be the array a tree gets, so every one of them is checked.
        self.files_by_id: dict[Any, set[str]] = {}
        for node, _ in _walk(self.schema):
            if node.get("__loader__") == "NdArrayNode" and "__id__" in node and isinstance(node.get("file"), str):
                self.files_by_id.setdefault(node["__id__"], set()).add(node["file"])

    def arrays(self, node: Any, what: str) -> list[Array]:
        if not isinstance(node, dict) or node.get("__loader__") != "NdArrayNode" or node.get("type") != "numpy":
            raise StructureError(f"{self.where}: {what} is not stored as a numpy array; it cannot be checked")
        files = {node.get("file")} | self.files_by_id.get(node.get("__id__"), set())
        out = []
        for name in sorted(f for f in files if isinstance(f, str)):
            try:
                out.append(np.load(io.BytesIO(self.zip.read(name)), allow_pickle=False))
            except (KeyError, ValueError, OSError, EOFError) as exc:
                raise StructureError(f"{self.where}: {what} ({name}) cannot be read: {exc}") from None
        return out


_TREE: Final = ("sklearn.tree._tree", "Tree")
_PREDICTOR: Final = ("sklearn.ensemble._hist_gradient_boosting.predictor", "TreePredictor")


def _field(arr: Array, name: str, where: str) -> Array:
    if arr.dtype.names is None or name not in arr.dtype.names or arr.ndim != 1:
        raise StructureError(f"{where}: the node array has no field {name!r} (dtype {arr.dtype})")
    return arr[name]


def check_skops(data: bytes, *, model_file: str, n_features: int | None) -> str:
    """Every tree in a skops file; returns a summary, raises `StructureError`."""
    sk = _Skops(data, model_file)
    trees = nodes_checked = 0
    for node, n_in in _walk(sk.schema):
        kind = (node.get("__module__"), node.get("__class__"))
        if kind not in (_TREE, _PREDICTOR):
            continue
        trees += 1
        where = f"{model_file}: {kind[1]} #{trees}"
        state = node.get("content", {}).get("content", {}) if isinstance(node.get("content"), dict) else {}
        if not isinstance(state, dict) or "nodes" not in state:
            raise StructureError(f"{where}: no node array to check")
        if kind == _TREE:
            args = node.get("__reduce__", {}).get("args", {}).get("content", []) if isinstance(
                node.get("__reduce__"), dict) else []
            own = _json_int(args[0]) if isinstance(args, list) and args else None
            if own is None:
                raise StructureError(f"{where}: the tree's number of features is missing")
            # The signature's width only when no enclosing estimator says what it is given: inside a pipeline a
            # tree sees transformed columns, as many as its estimators' n_features_in_ say.
            bound = _min_features(own, n_in if n_in is not None else n_features)
            for arr in sk.arrays(state["nodes"], f"{where} nodes"):
                left = _field(arr, "left_child", where)
                internal = left != -1
                check_tree(left, _field(arr, "right_child", where), internal, _field(arr, "feature", where), bound,
                           where=where)
                nodes_checked += len(arr)
        else:
            bound = n_in if n_in is not None else n_features
            bitsets = [len(a) for key in ("binned_left_cat_bitsets", "raw_left_cat_bitsets") if key in state
                       for a in sk.arrays(state[key], f"{where} {key}")]
            for arr in sk.arrays(state["nodes"], f"{where} nodes"):
                internal = ~_field(arr, "is_leaf", where).astype(bool)
                check_tree(_field(arr, "left", where), _field(arr, "right", where), internal,
                           _field(arr, "feature_idx", where), bound, where=where)
                categorical = internal & _field(arr, "is_categorical", where).astype(bool)
                if categorical.any():
                    idx = _field(arr, "bitset_idx", where)[categorical].astype(np.int64)
                    limit = min(bitsets) if bitsets else 0
                    if ((idx < 0) | (idx >= limit)).any():
                        raise StructureError(f"{where}: a categorical split points outside its {limit} bitsets")
                nodes_checked += len(arr)
    return f"{trees} trees, {nodes_checked} nodes checked" if trees else "no trees"


# --- XGBoost JSON -----------------------------------------------------------------------------------------------


def _int_array(value: Any, where: str, what: str) -> Array:
    try:
        arr = np.asarray(value, dtype=np.int64)
    except (ValueError, TypeError, OverflowError):
        raise StructureError(f"{where}: {what} is not a list of integers") from None
    if arr.ndim != 1:
        raise StructureError(f"{where}: {what} is not a flat list")
    return arr


def check_xgboost(data: bytes, *, model_file: str, n_features: int | None) -> str:
    """Every tree of an XGBoost model saved as JSON; returns a summary, raises `StructureError`."""
    try:
        doc = json.loads(data)
    except RecursionError:
        raise StructureError(f"{model_file}: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise StructureError(f"{model_file}: not an XGBoost JSON model (the structural check reads the JSON form: "
                             "save it with booster.save_model('model.json'))") from None
    try:
        learner = doc["learner"]
        num_feature = int(learner["learner_model_param"]["num_feature"])
        booster = learner["gradient_booster"]
        name = booster["name"]
    except (KeyError, TypeError, ValueError):
        raise StructureError(f"{model_file}: not an XGBoost model (no learner, num_feature or booster)") from None
    if name == "gblinear":
        return "linear booster, no trees"
    if name == "dart":
        booster = booster.get("gbtree", {}) if isinstance(booster, dict) else {}
    elif name != "gbtree":
        raise StructureError(f"{model_file}: unknown XGBoost booster {name!r}")
    trees = booster.get("model", {}).get("trees") if isinstance(booster.get("model"), dict) else None
    if not isinstance(trees, list):
        raise StructureError(f"{model_file}: the booster has no list of trees")
    bound = _min_features(num_feature, n_features)
    nodes = 0
    for i, tree in enumerate(trees):
        where = f"{model_file}: tree {i}"
        if not isinstance(tree, dict):
            raise StructureError(f"{where}: not an object")
        try:
            param = tree["tree_param"]
            n = int(param["num_nodes"])
            deleted = int(param.get("num_deleted", 0))
            left = _int_array(tree["left_children"], where, "left_children")
            right = _int_array(tree["right_children"], where, "right_children")
            feature = _int_array(tree["split_indices"], where, "split_indices")
        except (KeyError, TypeError, ValueError):
            raise StructureError(f"{where}: missing or malformed node arrays") from None
        if len(left) != n:
            raise StructureError(f"{where}: num_nodes is {n} but left_children has {len(left)} entries")
        check_tree(left, right, left != -1, feature, bound, where=where, allowed_orphans=max(deleted, 0))
        _check_xgboost_categories(tree, where)
        nodes += n
    return f"{len(trees)} trees, {nodes} nodes checked"


def _check_xgboost_categories(tree: Mapping[str, Any], where: str) -> None:
    cats = tree.get("categories", [])
    segments = _int_array(tree.get("categories_segments", []), where, "categories_segments")
    sizes = _int_array(tree.get("categories_sizes", []), where, "categories_sizes")
    if len(segments) != len(sizes) or ((segments < 0) | (sizes < 0) | (segments + sizes > len(cats))).any():
        raise StructureError(f"{where}: categorical splits point outside the tree's {len(cats)} categories")


# --- LightGBM text ----------------------------------------------------------------------------------------------


_LGB_FIELD: Final = re.compile(r"[A-Za-z_]+=[ -~]*")  # KEY=VALUE in printable ASCII, as LightGBM writes it
_LGB_INT: Final = re.compile(r"-?[0-9]{1,18}")


def _lgb_fields(lines: Sequence[str], where: str, *, tree: bool) -> dict[str, str]:
    """The KEY=VALUE lines as LightGBM reads them: lines end at "\n" only (not at the other characters
    `str.splitlines` breaks on), and a tree's fields end at its first blank line, where LightGBM stops
    reading the tree. A key given twice, a field after that blank line, or a line that is not KEY=VALUE is
    refused: each would let this check read a value other than the one LightGBM loads."""
    fields: dict[str, str] = {}
    ended = False
    for raw in lines:
        line = raw.removesuffix("\r")
        if not line.strip():
            ended = tree
            continue
        if not tree and "=" not in line:
            continue  # the header's first line ("tree") and the like
        if ended or (tree and not _LGB_FIELD.fullmatch(line)):  # the header may name features in any script
            raise StructureError(f"{where}: unexpected line {line[:60]!r} (LightGBM reads a tree's KEY=VALUE lines "
                                 "up to its first blank line)")
        key, _, value = line.partition("=")
        if key in fields:
            raise StructureError(f"{where}: {key} is given twice")
        fields[key] = value
    return fields


def _lgb_ints(fields: Mapping[str, str], key: str, count: int, where: str, *, exact: bool = True) -> Array:
    raw = fields.get(key)
    if raw is None:
        raise StructureError(f"{where}: no {key}")
    values = raw.split(" ")
    values = [v for v in values if v]
    # Indices are plain integers in the files LightGBM writes; "0.2e1" reads as 2 here but 0 to a C parser.
    if exact and not all(_LGB_INT.fullmatch(v) for v in values):
        raise StructureError(f"{where}: {key} is not a list of plain integers")
    try:
        arr = np.array([int(float(v)) for v in values], dtype=np.int64)
    except (ValueError, OverflowError):
        raise StructureError(f"{where}: {key} is not a list of integers") from None
    if len(arr) != count:
        raise StructureError(f"{where}: {key} has {len(arr)} entries, expected {count}")
    return arr


def check_lightgbm(data: bytes, *, model_file: str, n_features: int | None) -> str:
    """Every tree of a LightGBM model text; returns a summary, raises `StructureError`."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise StructureError(f"{model_file}: not a LightGBM model text (not UTF-8)") from None
    blocks = text.split("\nTree=")
    header = _lgb_fields(blocks[0].split("\n"), model_file, tree=False)
    try:
        max_feature_idx = int(header["max_feature_idx"])
    except (KeyError, ValueError):
        raise StructureError(f"{model_file}: not a LightGBM model text (no max_feature_idx)") from None
    bound = _min_features(max_feature_idx + 1, n_features)
    nodes = 0
    for block in blocks[1:]:
        lines = block.split("\nend of trees", 1)[0].split("\n")
        where = f"{model_file}: tree {lines[0].strip()[:20] if lines else '?'}"
        fields = _lgb_fields(lines[1:], where, tree=True)
        try:
            leaves = int(fields["num_leaves"])
            num_cat = int(fields.get("num_cat", "0"))
        except (KeyError, ValueError):
            raise StructureError(f"{where}: no num_leaves") from None
        if leaves < 1:
            raise StructureError(f"{where}: num_leaves is {leaves}")
        if leaves == 1:
            nodes += 1
            continue
        k = leaves - 1  # internal nodes; a child >= 0 is an internal node, < 0 is leaf ~child
        left = _lgb_ints(fields, "left_child", k, where)
        right = _lgb_ints(fields, "right_child", k, where)
        feature = _lgb_ints(fields, "split_feature", k, where)
        for side, kids in (("left", left), ("right", right)):
            leaf = kids < 0
            if ((~kids[leaf]) >= leaves).any():
                raise StructureError(f"{where}: a {side} child names leaf {int((~kids[leaf]).max())}, outside "
                                     f"0..{leaves - 1}")
        # One array over internal nodes then leaves: internal i -> i, leaf j -> k + j.
        left_all = np.concatenate([np.where(left < 0, k + ~left, left), np.full(leaves, -1)])
        right_all = np.concatenate([np.where(right < 0, k + ~right, right), np.full(leaves, -1)])
        internal = np.concatenate([np.ones(k, dtype=bool), np.zeros(leaves, dtype=bool)])
        check_tree(left_all, right_all, internal, np.concatenate([feature, np.zeros(leaves, dtype=np.int64)]), bound,
                   where=where)
        if num_cat > 0:
            decision = _lgb_ints(fields, "decision_type", k, where)
            threshold = _lgb_ints(fields, "threshold", k, where, exact=False)  # doubles; a category's index
            boundaries = _lgb_ints(fields, "cat_boundaries", num_cat + 1, where)
            cat_threshold = fields.get("cat_threshold", "").split()
            categorical = (decision & 1).astype(bool)
            if ((threshold[categorical] < 0) | (threshold[categorical] >= num_cat)).any() or (
                    (boundaries < 0) | (boundaries > len(cat_threshold))).any() or (np.diff(boundaries) < 0).any():
                raise StructureError(f"{where}: categorical splits point outside the tree's categories")
        nodes += k + leaves
    return f"{len(blocks) - 1} trees, {nodes} nodes checked"


# --- entry points ---------------------------------------------------------------------------------------------


def check_model(runtime: str, model_file: str, data: bytes, *, n_features: int | None) -> str:
    """Check one model file for its runtime; returns what was checked, raises `StructureError`.

    `n_features` is the signature's fixed number of input columns (None when the signature leaves it open).
    """
    if runtime == "sklearn":
        if model_file.endswith(_PICKLE_SUFFIXES):
            return "a pickle: not checked (loading it is the operator's explicit trust)"
        return check_skops(data, model_file=model_file, n_features=n_features)
    if runtime == "xgboost":
        return check_xgboost(data, model_file=model_file, n_features=n_features)
    if runtime == "lightgbm":
        return check_lightgbm(data, model_file=model_file, n_features=n_features)
    return "no structural check for this runtime"


def check_package_models(manifest: Manifest, contents: Mapping[str, bytes]) -> str:
    """Check the package's model file and its fallback; returns a summary, raises `StructureError`."""
    spec = manifest.inputs[0] if len(manifest.inputs) == 1 else None
    n_features = spec.shape[1] if spec is not None and len(spec.shape) == 2 and spec.shape[1] > 0 else None
    parts = []
    for runtime, model_file in ((manifest.runtime, manifest.model_file),
                                (manifest.fallback_runtime, manifest.fallback_model_file)):
        if runtime is None or model_file is None:
            continue
        if model_file not in contents:
            raise StructureError(f"model file {model_file!r} is not in the package")
        parts.append(f"{model_file}: {check_model(runtime, model_file, contents[model_file], n_features=n_features)}")
    return "; ".join(parts)
