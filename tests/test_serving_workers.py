"""Model workers' pure parts: the channel's framing and the restart/quarantine decisions."""

from __future__ import annotations

import numpy as np
import pytest

from modelcd.serving.channel import FrameError, FrameReader, decode, encode
from modelcd.serving.quarantine import CrashHistory


def _roundtrip(parts: list[bytes | memoryview], chunk: int) -> list[tuple[memoryview, memoryview]]:
    data = b"".join(parts)
    reader = FrameReader()
    frames = []
    for i in range(0, len(data), chunk):
        frames += reader.feed(data[i:i + chunk])
    return frames


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20], ids=["byte by byte", "odd chunks", "whole"])
def test_arrays_survive_the_channel_in_any_chunking(chunk: int) -> None:
    """Float, int, bool, empty, non-contiguous and object (BYTES) tensors come back equal, in order, with meta."""
    arrays = {"f": np.arange(12, dtype=np.float32).reshape(3, 4), "i": np.array([[1, -2]], dtype=np.int64),
              "b": np.array([True, False]), "e": np.zeros((0, 4)), "t": np.arange(6.0).reshape(2, 3).T,
              "o": np.array([b"ab", b"c"], dtype=object)}
    parts = encode("predict", 7, "m:1", {"k": [1, "x"]}, arrays) + encode("ok", 8, payload=b"tail")
    frames = _roundtrip(parts, chunk)
    assert len(frames) == 2
    op, ident, key, meta, out, rest = decode(*frames[0])
    assert (op, ident, key, meta, bytes(rest)) == ("predict", 7, "m:1", {"k": [1, "x"]}, b"")
    assert list(out) == list(arrays)
    for name, a in arrays.items():
        assert out[name].dtype == a.dtype and out[name].shape == a.shape
        assert np.array_equal(out[name], a)
    assert decode(*frames[1])[5].tobytes() == b"tail"


def test_a_lying_frame_is_refused() -> None:
    """A tensor that claims more bytes than its frame holds is a FrameError, not a read past the buffer."""
    parts = encode("ok", 1, arrays={"x": np.arange(4.0)})
    header, payload = _roundtrip(parts, 1 << 20)[0]
    with pytest.raises(FrameError):
        decode(header, payload[:-8])
    with pytest.raises(FrameError):
        decode(b"\xc1", payload)


def test_backoff_doubles_within_the_window_and_resets_after_it() -> None:
    """Deaths within the window double the wait up to the cap; older deaths no longer count."""
    h = CrashHistory()
    assert h.record(0.0, 60) == 1 and h.backoff(0.5, 30) == 0.5
    assert h.record(1.0, 60) == 2 and h.backoff(0.5, 30) == 1.0
    assert h.record(2.0, 60) == 3 and h.backoff(0.5, 1.5) == 1.5
    assert h.record(100.0, 60) == 1 and h.backoff(0.5, 30) == 0.5  # the first three are outside the window
    assert h.total == 4


def test_requests_stack_and_split_back_only_when_they_fit() -> None:
    """Stackable requests merge with their row counts; mismatched dtypes, names or shapes, or per-batch outputs, do not."""
    from modelcd.serving.batching import merge, split

    a = {"x": np.ones((2, 3))}
    b = {"x": np.zeros((1, 3))}
    merged = merge([a, b])
    assert merged is not None and merged[1] == [2, 1] and merged[0]["x"].shape == (3, 3)
    parts = split({"y": np.arange(3), "p": np.arange(6).reshape(3, 2)}, [2, 1])
    assert parts is not None and parts[0]["y"].tolist() == [0, 1] and parts[1]["p"].tolist() == [[4, 5]]
    assert merge([a, {"x": np.ones((1, 3), dtype=np.float32)}]) is None
    assert merge([a, {"z": np.ones((1, 3))}]) is None
    assert merge([a, {"x": np.ones((1, 4))}]) is None
    assert split({"mean": np.float64(1.0)}, [2, 1]) is None
    assert split({"y": np.arange(4)}, [2, 1]) is None


def test_the_deployment_view_counts_nodes_that_quarantined_a_model() -> None:
    """`modelcd models` learns from NodeStatus which nodes quarantined a version, and forgets when they stop."""
    from modelcd.events.schemas import LoadedModel, NodeStatus
    from modelcd.ingest.tracking import TrackingView

    view = TrackingView()
    bad = LoadedModel(name="m", version="1", sha256="a", state="failed", quarantined=True, restarts=3)
    view.apply(NodeStatus(node="n1", ready=True, models=[bad]))
    view.apply(NodeStatus(node="n2", ready=True, models=[LoadedModel(name="m", version="1", sha256="a")]))
    assert view.nodes_quarantined("m", "1", "a") == 1 and view.nodes_serving("m", "1", "a") == 1
    view.apply(NodeStatus(node="n1", ready=False, models=[bad], stopping=True))
    assert view.nodes_quarantined("m", "1", "a") == 0
