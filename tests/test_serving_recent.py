"""The node's request history (serving/recent.py): what a restarting node loads before it reports ready."""

from __future__ import annotations

from pathlib import Path

from modelcd.serving import recent


def test_history_round_trips_and_bad_files_are_an_empty_history(tmp_path: Path) -> None:
    path = tmp_path / "node" / "recent.json"
    assert recent.load(path) == {}
    recent.save(path, {"a:1": 100.0, "b:2": 200.5})
    assert recent.load(path) == {"a:1": 100.0, "b:2": 200.5}
    assert [p.name for p in path.parent.iterdir()] == ["recent.json"]  # no temporary file left behind
    for junk in (b"{not json", b"[]", b'{"format": 99, "last_used": {}}', b'{"format": 1, "last_used": [1]}'):
        path.write_bytes(junk)
        assert recent.load(path) == {}
    path.write_bytes(b'{"format": 1, "last_used": {"a:1": 5, "b:1": "x", "c:1": true, "d:1": -1}}')
    assert recent.load(path) == {"a:1": 5.0}


def test_split_loads_pinned_and_recently_used_before_ready_the_rest_after() -> None:
    hot = ["p:1", "n1:1", "n2:1", "u:1", "old:1"]
    last = {"u:1": 4_000.0, "old:1": 10.0, "gone:1": 4_000.0}
    before, after = recent.split(hot, last, {"p:1"}, now=5_000.0, window=3_600.0)
    assert before == ["p:1", "u:1"] and after == ["n1:1", "n2:1", "old:1"]


def test_without_history_or_window_the_whole_hot_set_loads_before_ready() -> None:
    hot = ["a:1", "b:1"]
    assert recent.split(hot, {}, set(), now=1e9, window=3_600.0) == (hot, [])
    assert recent.split(hot, {"a:1": 1e9}, set(), now=1e9, window=0) == (hot, [])
