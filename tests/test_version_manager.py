"""VersionManager's rules on a real model store, with a stand-in for loading (the servers' own
load and canary are tested with their servers): swaps, refusals, pin/unpin and rollbacks; and with
the policy server's own load and canary, that a flipped bit in the weights is still refused."""
from __future__ import annotations

import hashlib
import shutil

import blake3

import pytest
import torch

from common import model_store
from common.model_store import CorruptCheckpoint, ModelStore, verify
from serve.loader import load_policy
from serve.server import policy_canary
from serve.versions import Refused, ServedModel, VersionManager


def _store(tmp_path, n: int) -> ModelStore:
    store = ModelStore(tmp_path / "store")
    for i in range(n):
        v = f"v{i:04d}"
        store.publish(v, lambda d, v=v: (d / "weights.txt").write_text(v), parent=None, metrics={}, offsets={})
    return store


def _manager(store: ModelStore, refuse: set[str] = frozenset()) -> tuple[VersionManager, list[str]]:
    applied: list[str] = []

    def canary(loaded, current):
        if loaded in refuse:
            raise Refused(f"{loaded} fails the canary")
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


def _flip_a_weight_byte(weights) -> None:
    """One bit flipped in the middle of the tensor data, past the safetensors header: the file still
    parses and loads (to different weights), so only the digest can tell."""
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))


def test_a_flipped_bit_in_the_weights_is_refused_with_the_real_loader(tmp_path, tiny_gpt2):
    store = ModelStore(tmp_path / "store")
    for v in ("v0000", "v0001", "v0002"):
        store.publish(v, lambda d: shutil.copytree(tiny_gpt2, d / "policy"), parent=None, metrics={}, offsets={})
    weights = store.path("v0001") / "policy" / "model.safetensors"
    _flip_a_weight_byte(weights)
    flipped = load_policy(weights.parent, cpu_pack="none").model.state_dict()
    intact = load_policy(tiny_gpt2, cpu_pack="none").model.state_dict()
    assert any(not torch.equal(flipped[k], intact[k]) for k in intact)   # it loads: only the hash refuses it

    loaded: list[str] = []

    def load(v):
        loaded.append(v)
        return load_policy(store.path(v) / "policy", cpu_pack="none")
    current = load_policy(store.path("v0000") / "policy", cpu_pack="none")
    m = VersionManager(store, load=load, canary=policy_canary, apply=lambda s: None,
                       current=ServedModel("v0000", current))
    with pytest.raises(Refused, match="model.safetensors does not match its blake3"):
        m.switch_to("v0001")
    assert loaded == [] and m.current.version == "v0000" and "v0001" in m.refused
    m.offer("v0002")                          # an intact version still goes through load and canary
    assert loaded == ["v0002"] and m.current.version == "v0002"


def test_the_policy_canary_refuses_weights_that_give_non_finite_logits(tiny_gpt2):
    served = load_policy(tiny_gpt2, cpu_pack="none")
    policy_canary(load_policy(tiny_gpt2, cpu_pack="none"), served)   # an intact copy passes
    broken = load_policy(tiny_gpt2, cpu_pack="none")
    with torch.no_grad():
        next(p for n, p in broken.model.named_parameters() if "ln_f" in n or "norm" in n).fill_(float("nan"))
    with pytest.raises(Refused, match="non-finite logits on the canary prompt \\(prefill\\)"):
        policy_canary(broken, served)


def test_the_engine_is_held_during_a_swap_and_released_when_refused(tmp_path):
    store = _store(tmp_path, 3)
    calls: list[str] = []
    m = VersionManager(store, load=lambda v: calls.append(f"load {v}") or v,
                       canary=lambda o, c: (_ for _ in ()).throw(Refused("bad")) if o == "v0002" else None,
                       apply=lambda s: calls.append(f"apply {s.version}"), current=ServedModel("v0000", "v0000"),
                       hold=lambda: calls.append("hold"), release=lambda: calls.append("release"))
    m.switch_to("v0001")
    with pytest.raises(Refused):
        m.switch_to("v0002")
    (store.path("v0001") / "weights.txt").write_text("flipped bits")
    m.current = ServedModel("v0000", "v0000")
    with pytest.raises(Refused):
        m.switch_to("v0001")     # refused by verify: before any hold
    assert calls == ["hold", "load v0001", "apply v0001", "hold", "load v0002", "release"]


def test_a_server_verifies_the_part_it_loads(tmp_path):
    """The policy server checks policy/ and the RM server rm/; a corrupt file elsewhere in the version
    is the other server's refusal (and the trainer's, which verifies all of it)."""
    store = ModelStore(tmp_path / "store")
    store.publish("v0001", lambda d: [(d / p).mkdir() or (d / p / "w.bin").write_bytes(p.encode() * 100)
                                      for p in ("policy", "rm")], parent=None, metrics={}, offsets={})
    (store.path("v0001") / "rm" / "w.bin").write_bytes(b"flipped" * 100)
    assert verify(store.path("v0001"), part="policy")["version"] == "v0001"
    for part in ("rm", None):
        with pytest.raises(CorruptCheckpoint, match="rm/w.bin does not match"):
            verify(store.path("v0001"), part=part)
    with pytest.raises(CorruptCheckpoint, match="no file under critic/"):
        verify(store.path("v0001"), part="critic")


def test_the_manifest_holds_sha256_and_blake3_and_readers_check_blake3_on_several_threads(tmp_path, monkeypatch):
    store = ModelStore(tmp_path / "store")
    data = bytes(range(256)) * 40_000 + b"x"   # ~10 MB: BLAKE3 splits it across threads
    store.publish("v0001", lambda d: (d / "w.bin").write_bytes(data), parent=None, metrics={}, offsets={})
    m = store.manifest("v0001")
    assert m["files"]["w.bin"] == hashlib.sha256(data).hexdigest()     # what sha256sum checks by hand
    assert m["blake3"]["w.bin"] == blake3.blake3(data).hexdigest()
    checked: list[tuple[str, int]] = []
    real = model_store.file_matches
    monkeypatch.setattr(model_store, "file_matches", lambda p, a, d, t: checked.append((a, t)) or real(p, a, d, t))
    verify(store.path("v0001"), workers=2)
    assert checked == [("blake3", 2)]
    w = store.path("v0001") / "w.bin"
    for bad in (data[:-1], data + b"!", data[:1500] + b"?" + data[1501:]):   # shorter, longer, one byte
        w.write_bytes(bad)
        with pytest.raises(CorruptCheckpoint, match="w.bin does not match its blake3"):
            verify(store.path("v0001"), workers=2)


def test_a_manifest_without_blake3_is_checked_by_sha256(tmp_path, monkeypatch):
    """Versions published before BLAKE3 (or where the package is missing) verify by their sha256; every
    byte is still checked."""
    store = ModelStore(tmp_path / "store")
    monkeypatch.setattr(model_store, "_blake3", lambda: None)   # a publisher without the blake3 package
    store.publish("v0001", lambda d: (d / "w.bin").write_bytes(b"weights" * 1000), parent=None, metrics={}, offsets={})
    assert "blake3" not in store.manifest("v0001")
    monkeypatch.undo()
    assert verify(store.path("v0001"))["version"] == "v0001"
    (store.path("v0001") / "w.bin").write_bytes(b"weights" * 999 + b"weighs")
    with pytest.raises(CorruptCheckpoint, match="w.bin does not match its sha256"):
        verify(store.path("v0001"))


def test_an_unreadable_blake3_table_refuses_the_version(tmp_path):
    store = ModelStore(tmp_path / "store")
    store.publish("v0001", lambda d: (d / "w.bin").write_bytes(b"w"), parent=None, metrics={}, offsets={})
    mf = store.path("v0001") / model_store.MANIFEST
    mf.write_text(mf.read_text().replace('"blake3": {', '"blake3": ["x"], "unused": {'))
    with pytest.raises(CorruptCheckpoint, match="unreadable blake3"):
        verify(store.path("v0001"))


def test_a_file_that_cannot_be_read_refuses_the_version(tmp_path, monkeypatch):
    """An I/O error while hashing is a refusal (CorruptCheckpoint), not an exception the update watcher
    would retry forever."""
    store = ModelStore(tmp_path / "store")
    store.publish("v0001", lambda d: (d / "w.bin").write_bytes(b"w"), parent=None, metrics={}, offsets={})
    monkeypatch.setattr(model_store, "file_matches", lambda *a: (_ for _ in ()).throw(OSError(5, "Input/output error")))
    with pytest.raises(CorruptCheckpoint, match="w.bin cannot be read"):
        verify(store.path("v0001"))


def test_a_pin_is_not_undone_by_an_update_announced_while_it_loads(tmp_path):
    """offer(v0003) arrives while pin(v0001) is loading: it waits for the lock, then sees the pin."""
    import threading
    import time
    store = _store(tmp_path, 4)
    loading = threading.Event()

    def slow_load(v):
        if v == "v0001":
            loading.set()
            time.sleep(0.5)
        return v
    m = VersionManager(store, load=slow_load, canary=lambda a, b: None, apply=lambda s: None,
                       current=ServedModel("v0000", "v0000"))
    pin = threading.Thread(target=m.pin, args=("v0001",))
    pin.start()
    loading.wait(5)
    m.offer("v0003")          # checks pinned before the lock (not yet set), then again under it
    pin.join(5)
    assert m.pinned and m.current.version == "v0001"


def test_a_canary_that_crashes_refuses_the_version_once(tmp_path):
    store = _store(tmp_path, 2)
    calls = []

    def canary(loaded, current):
        calls.append(loaded)
        raise IndexError("index out of range in self")   # e.g. token ids past an RM's embedding table
    m = VersionManager(store, load=lambda v: v, canary=canary, apply=lambda s: None, current=ServedModel("v0000", "v0000"))
    m.offer("v0001")
    assert m.current.version == "v0000" and "IndexError" in m.refused["v0001"]
    assert m.newest_servable() == "v0000"   # the watcher's restart does not offer it again and again
    assert calls == ["v0001"]


def test_a_version_not_in_the_store_yet_is_not_refused_for_good(tmp_path):
    store = _store(tmp_path, 1)
    m, applied = _manager(store)
    with pytest.raises(Refused):
        m.pin("v0001")                       # a typo, or not published yet
    assert not m.pinned and "v0001" not in m.refused
    with pytest.raises(Refused):
        m.pin("latest")                      # not a version name at all: refused, not a ValueError
    store.publish("v0001", lambda d: (d / "weights.txt").write_text("v0001"), parent=None, metrics={}, offsets={})
    assert m.pin("v0001").version == "v0001" and m.pinned


def test_a_manifest_that_is_not_utf8_or_an_unlisted_file_refuses_the_version(tmp_path):
    store = _store(tmp_path, 2)
    path = store.path("v0001") / "manifest.json"
    raw = bytearray(path.read_bytes())
    raw[5] |= 0x80                           # one high bit: not UTF-8 any more
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpoint, match="unreadable manifest.json"):
        verify(store.path("v0001"))
    assert store.newest_verified()[0] == "v0000"   # skipped, not a crash
    # a file nobody listed, that a loader would read (added_tokens.json beside the tokenizer)
    (store.path("v0000") / "added_tokens.json").write_text('{"<evil>": 5}')
    with pytest.raises(CorruptCheckpoint, match="added_tokens.json is not in the manifest"):
        verify(store.path("v0000"))


def test_a_manifest_json_inside_a_part_is_listed_and_hashed(tmp_path):
    store = ModelStore(tmp_path / "store")

    def write(d):
        (d / "policy").mkdir()
        (d / "policy" / "weights.txt").write_text("w")
        (d / "policy" / "manifest.json").write_text('{"version": "v7"}')   # serve.loader.read_version reads it
    store.publish("v0000", write, parent=None, metrics={}, offsets={})
    assert "policy/manifest.json" in verify(store.path("v0000"), "policy")["files"]
    (store.path("v0000") / "policy" / "manifest.json").write_text('{"version": "v8"}')
    with pytest.raises(CorruptCheckpoint, match="policy/manifest.json does not match"):
        verify(store.path("v0000"), "policy")
