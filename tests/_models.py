"""Test-only model loaders. They run inside model worker processes, so they are module-level functions
the worker imports by name; what a model does is chosen by its package's name (its manifest)."""

from __future__ import annotations

import time
from typing import Any

from modelcd.serving.worker_main import default_loader

MAGIC = 99.0  # a first feature value the faulty runtimes react to


class Faulty:
    """Wraps a real runtime: misbehaves on requests whose first value is MAGIC (always a bit slow if 'slow')."""

    def __init__(self, inner: Any, mode: str) -> None:
        self.inner, self.mode = inner, mode
        self.name = inner.name

    def predict(self, inputs: Any) -> Any:
        magic = inputs["input"][0, 0] == MAGIC
        if self.mode == "slow":
            time.sleep(0.002)
            if magic:
                time.sleep(1.0)  # long enough to be in flight when the node is asked to stop
        if magic:
            if self.mode == "raise":
                raise RuntimeError("boom on purpose")
            if self.mode == "hang":
                time.sleep(120)
        return self.inner.predict(inputs)

    def close(self) -> None:
        self.inner.close()


def faulty_loader(pkg: Any) -> Any:
    """'raiser' raises, 'hanger' hangs, 'slow' is slow on MAGIC; any other name is the plain runtime."""
    mode = {"raiser": "raise", "hanger": "hang", "slow": "slow"}.get(pkg.manifest.name)
    runtime = default_loader(pkg)
    return Faulty(runtime, mode) if mode else runtime


# ---------------------------------------------------------------------- the hostile corpus's Python models

class Hostile:
    """An iris tree whose predict does something hostile when the first value is MAGIC; `arg` comes from the
    package's description (a path to write, a secret to look for)."""

    def __init__(self, inner: Any, mode: str, arg: str) -> None:
        self.inner, self.mode, self.arg = inner, mode, arg
        self.name = inner.name

    def predict(self, inputs: Any) -> Any:
        if inputs["input"][0, 0] == MAGIC:
            _misbehave(self.mode, self.arg)
        return self.inner.predict(inputs)

    def close(self) -> None:
        self.inner.close()


def _misbehave(mode: str, arg: str) -> None:
    import ctypes
    import os
    import subprocess

    import numpy as np

    if mode == "segv":
        ctypes.string_at(0)  # a native null dereference
    elif mode == "abort":
        os.abort()
    elif mode == "exit":
        os._exit(3)
    elif mode == "hog":
        np.ones((1 << 33,), dtype=np.uint8)  # 8 GiB
    elif mode == "spin":
        while True:
            pass
    elif mode == "spawn":
        subprocess.Popen(["sleep", "300"])
        raise RuntimeError("spawned a process")
    elif mode == "forkbomb":
        for _ in range(64):
            os.fork()
    elif mode == "write":
        with open(arg, "w") as f:
            f.write("escaped")
        raise RuntimeError(f"wrote {arg}")
    elif mode == "snoop":
        found = [k for k, v in os.environ.items() if arg in v]
        for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if arg.encode() in f.read():
                        found.append(f"/proc/{pid}/environ")
            except OSError:
                pass
        raise RuntimeError(f"secret found in: {found}" if found else "no secret found")


HOSTILE_MODES = ("segv", "abort", "exit", "hog", "spin", "spawn", "forkbomb", "write", "snoop")


def hostile_loader(pkg: Any) -> Any:
    """Names 'h-<mode>' misbehave on MAGIC; 'h-loadcrash' crashes natively while loading; others are plain."""
    import ctypes

    name = pkg.manifest.name
    if name == "h-loadcrash":
        ctypes.string_at(0)
    runtime = default_loader(pkg)
    mode = name[2:] if name.startswith("h-") else ""
    return Hostile(runtime, mode, pkg.manifest.description) if mode in HOSTILE_MODES else runtime


# ---------------------------------------------------------------------- hostile artifacts (the default loader)

def segv_tree(name: str = "segv-tree", version: str = "1") -> Any:
    """A skops decision tree (only default-trusted types) whose root's right child index is 10^9: the samples
    take the left branch and pass; the first request taking the right one reads far out of bounds (SIGSEGV)."""
    import numpy as np
    from sklearn.datasets import load_iris
    from sklearn.tree import DecisionTreeClassifier

    from modelcd.runtimes.build import build_package

    x, y = load_iris(return_X_y=True)
    model = DecisionTreeClassifier(max_depth=3, random_state=0).fit(x, y)
    state = model.tree_.__getstate__()
    nodes = state["nodes"].copy()
    nodes["right_child"][0] = 10**9
    state["nodes"] = nodes
    model.tree_.__setstate__(state)
    return build_package(model, name=name, version=version, owner="tests", expiry="30d",
                         sample_inputs={"input": np.asarray(x[:5], dtype=np.float64)})


SEGV_TREE_CRASH_ROW = [6.3, 3.3, 6.0, 2.5]  # petal width 2.5 > 0.8: the edited branch


def loop_onnx(name: str = "loop", version: str = "1") -> Any:
    """An ONNX graph whose Loop trip count is max(input): microseconds on its samples, forever on 1e12."""
    import numpy as np
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h

    from modelcd.runtimes.build import build_package

    body = h.make_graph(
        [h.make_node("Constant", [], ["one"], value=h.make_tensor("o", T.FLOAT, [], [1.0])),
         h.make_node("Add", ["acc_in", "one"], ["acc_out"]), h.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, []),
         h.make_tensor_value_info("acc_in", T.FLOAT, [])],
        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("acc_out", T.FLOAT, [])])
    nodes = [
        h.make_node("ReduceMax", ["input"], ["mx"], keepdims=0),
        h.make_node("Cast", ["mx"], ["trip"], to=T.INT64),
        h.make_node("Constant", [], ["true"], value=h.make_tensor("t", T.BOOL, [], [True])),
        h.make_node("Constant", [], ["zero"], value=h.make_tensor("z", T.FLOAT, [], [0.0])),
        h.make_node("Loop", ["trip", "true", "zero"], ["count"], body=body),
        h.make_node("Mul", ["count", "zero"], ["nothing"]),
        h.make_node("Add", ["input", "nothing"], ["output"]),
    ]
    graph = h.make_graph(nodes, "loop", [h.make_tensor_value_info("input", T.FLOAT, [None, 2])],
                         [h.make_tensor_value_info("output", T.FLOAT, [None, 2])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return build_package(model, name=name, version=version, owner="tests", expiry="30d",
                         sample_inputs={"input": np.array([[1, 2], [3, 1]], np.float32)})



def alloc_onnx(name: str = "alloc", version: str = "1") -> Any:
    """An ONNX graph that allocates max(input) x 1000 floats: a few KB on its samples, terabytes on 1e9."""
    import numpy as np
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h

    from modelcd.runtimes.build import build_package

    nodes = [
        h.make_node("ReduceMax", ["input"], ["mx"], keepdims=1),  # [1, 1]
        h.make_node("Reshape", ["mx", "one"], ["mx1"]),
        h.make_node("Cast", ["mx1"], ["rows"], to=T.INT64),
        h.make_node("Concat", ["rows", "cols"], ["shape"], axis=0),
        h.make_node("ConstantOfShape", ["shape"], ["big"], value=h.make_tensor("v", T.FLOAT, [1], [1.0])),
        h.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
        h.make_node("Mul", ["total", "zero"], ["nothing"]),
        h.make_node("Add", ["input", "nothing"], ["output"]),
    ]
    inits = [h.make_tensor("one", T.INT64, [1], [1]), h.make_tensor("cols", T.INT64, [1], [1000]),
             h.make_tensor("zero", T.FLOAT, [], [0.0])]
    graph = h.make_graph(nodes, "alloc", [h.make_tensor_value_info("input", T.FLOAT, [None, 2])],
                         [h.make_tensor_value_info("output", T.FLOAT, [None, 2])], initializer=inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return build_package(model, name=name, version=version, owner="tests", expiry="30d",
                         sample_inputs={"input": np.array([[1, 2], [3, 1]], np.float32)})


# ---------------------------------------------------------------------- what a worker inherited

class GcState:
    """Answers with its worker's collector state: objects frozen (inherited from the zygote) and whether it runs."""

    name = "gc-state"

    def predict(self, inputs: Any) -> Any:
        import gc

        import numpy as np

        return {"frozen": np.array([gc.get_freeze_count()]), "enabled": np.array([int(gc.isenabled())])}

    def close(self) -> None:
        pass


def gc_state_loader(pkg: Any) -> Any:
    return GcState()
