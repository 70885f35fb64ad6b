"""VersionManager's rules on a real model store, with a stand-in for loading (the servers' own
load and canary are tested with their servers): swaps, refusals, pin/unpin and rollbacks."""
from __future__ import annotations

import pytest

from common.model_store import ModelStore
from serve.versions import Refused, ServedModel, VersionManager


def _store(tmp_path, n: int) -> ModelStore:
    store = ModelStore(tmp_path / "store")
    for i in range(n):
        v = f"v{i:04d}"
        store.publish(v, lambda d, v=v: (d / "weights.txt").write_text(v), parent=None, metrics={}, offsets={})
    return store


def _manager(store: ModelStore, refuse: set[str] = frozenset()) -> tuple[VersionManager, list[str]]:
    applied: list[str] = []

    def canary(obj, current):
        if obj in refuse:
            raise Refused(f"{obj} fails the canary")
    m = VersionManager(store, load=lambda v: v, canary=canary, apply=lambda s: applied.append(s.version),
                       current=ServedModel("v0000", "v0000"))
    return m, applied


def test_two_rollbacks_in_a_row_go_back_twice_and_stay_pinned(tmp_path):
    m, applied = _manager(_store(tmp_path, 3))
    m.offer("v0001")
    m.offer("v0002")
    assert m.rollback().version == "v0001" and m.pinned
    assert m.rollback().version == "v0000"
    assert applied == ["v0001", "v0002", "v0001", "v0000"]
    with pytest.raises(Refused, match="nothing to roll back to"):
        m.rollback()
    m.offer("v0002")                         # pinned: an announcement does not undo the rollback
    assert m.current.version == "v0000"
    assert m.unpin().version == "v0002"      # unpinned: the newest servable version again


def test_a_refused_version_is_skipped_and_never_retried(tmp_path):
    m, applied = _manager(_store(tmp_path, 3), refuse={"v0002"})
    m.offer("v0001")
    m.offer("v0002")                         # refused: logged, counted, still serving v0001
    assert m.current.version == "v0001" and "v0002" in m.refused
    assert m.newest_servable() == "v0001"
    m.offer("v0000")                         # older than the current one: ignored
    assert applied == ["v0001"]
    assert [(x["version"], x["serving"], bool(x["refused_reason"])) for x in m.list()] == [
        ("v0000", False, False), ("v0001", True, False), ("v0002", False, True)]


def test_a_corrupt_version_is_refused_before_loading(tmp_path):
    store = _store(tmp_path, 2)
    (store.path("v0001") / "weights.txt").write_text("flipped bits")
    loaded: list[str] = []
    m = VersionManager(store, load=lambda v: loaded.append(v) or v, canary=lambda o, c: None,
                       apply=lambda s: None, current=ServedModel("v0000", "v0000"))
    with pytest.raises(Refused):
        m.switch_to("v0001")
    assert loaded == [] and m.current.version == "v0000"
