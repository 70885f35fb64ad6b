"""Hot-swap of model versions for a running server (policy or RM), and its admin RPCs.

The model-updates topic only says "a version exists"; the model store is the truth. On an update:
  1. verify: the BLAKE3 of every file the server loads (its part of the version: policy/ or rm/)
     against the version's manifest, on two threads (common/model_store.verify);
  2. load into a standby copy on the watcher thread, off the request path; from here the server is
     held (`hold`: the policy engine admits nothing new, and its running batch drains while the
     version loads instead of after);
  3. canary: the server's own check on fixed inputs (finite logits/logprobs/scores, sane output)
     and compatibility with what is served (e.g. the same tokenizer);
  4. swap: the server's `apply` (the policy engine swaps between steps once its batch has drained,
     and the requests that waited start on the new version; the RM server swaps a reference between
     requests). A version refused in 2-3 releases the hold: the waiting requests run on the old one.
A version that fails 1-3 is refused (a log line, rlhf_<server>_version_events_total{result="refused"}) and the
current one keeps serving. Admin: list, pin (serve this version, ignore updates), unpin, roll back.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generic, TypeVar

import grpc
from kafka import KafkaConsumer, TopicPartition

from common import model_store
from common.omp import release_thread_pool
from feedback.topics import MODEL_UPDATES
from protos.build import ensure_generated

ensure_generated()
from rlhf.v1 import models_pb2 as mpb  # noqa: E402
from rlhf.v1 import models_pb2_grpc as mgrpc  # noqa: E402

log = logging.getLogger(__name__)


STEPS = ("verify", "load", "canary", "apply")   # steps 1-4 above, as the swap log line names them


class Refused(Exception):
    """A version that may not be served: corrupt, incomplete, incompatible or failing the canary."""


Loaded = TypeVar("Loaded")   # what a server loads from a version: serve.loader.LoadedPolicy, serve.rm_server.LoadedRM


@dataclass
class ServedModel(Generic[Loaded]):
    """What a server swaps in: a loaded version."""
    version: str
    loaded: Loaded


@dataclass
class VersionManager(Generic[Loaded]):
    store: model_store.ModelStore
    load: Callable[[str], Loaded]                 # version -> a standby copy
    canary: Callable[[Loaded, Loaded], None]      # (candidate, current) -> raises Refused
    apply: Callable[[ServedModel[Loaded]], None]  # makes the candidate the served version
    current: ServedModel[Loaded]
    on_event: Callable[[str, str], None] = lambda result, version: None   # metrics hook
    hold: Callable[[], None] = lambda: None      # a swap starts: stop admitting, let the batch drain meanwhile
    release: Callable[[], None] = lambda: None   # the version was refused: admit again
    part: str | None = None                      # the subfolder of a version this server loads: verify only it
    verify_workers: int = 2                      # threads hashing a file
    pinned: bool = False
    history: list[str] = field(default_factory=list)   # versions served, oldest first
    refused: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.history.append(self.current.version)

    def switch_to(self, version: str, pin: bool | None = None, update: bool = False) -> ServedModel[Loaded]:
        """Steps 1-4 for one version; raises Refused (and counts it) if it may not be served. `pin`
        (True/False) sets `pinned` under the same lock, so an update announced meanwhile cannot slip in
        between the swap and the pin; `update`: an announced version, skipped (the current one returned)
        if, by the time the lock is held, the server is pinned or serves it or a newer one."""
        with self.lock:
            if update and (self.pinned or self._older_than_current(version)):
                return self.current
            if version == self.current.version:
                if pin is not None:
                    self.pinned = pin
                return self.current
            ends = [time.monotonic()]   # the start, then the end of each step: where a slow swap spent its time
            held = False
            try:
                try:
                    model_store.verify(self.store.path(version), self.part, self.verify_workers)
                except (model_store.CorruptCheckpoint, ValueError) as e:
                    raise Refused(str(e)) from e
                ends.append(time.monotonic())
                held = True
                self.hold()   # the running batch drains during steps 2-3 (apply then has nothing to wait for)
                try:
                    loaded = self.load(version)
                except Exception as e:  # a checkpoint that does not load is incompatible, not a crash
                    raise Refused(f"{version} does not load: {e}") from e
                ends.append(time.monotonic())
                try:
                    self.canary(loaded, self.current.loaded)
                except Refused:
                    raise
                except Exception as e:   # a canary that crashes refuses the version, else it is retried for ever
                    raise Refused(f"{version}: the canary failed: {type(e).__name__}: {e}") from e
                ends.append(time.monotonic())
                new = ServedModel(version, loaded)
                try:
                    self.apply(new)
                except Exception as e:   # e.g. no memory for its cache: the old version is still served
                    raise Refused(f"{version} could not be applied: {type(e).__name__}: {e}") from e
                ends.append(time.monotonic())
            except Refused as e:
                if held:
                    self.release()
                if model_store.VERSION_RE.match(version) and self.store.path(version).is_dir():   # else it may come later
                    self.refused[version] = str(e)
                self.on_event("refused", version)
                log.error("refusing version %s, still serving %s: %s", version, self.current.version, e)
                raise
            except BaseException:
                if held:
                    self.release()
                raise
            finally:   # load and canary ran torch on this thread: its OpenMP pool would slow the engine's
                release_thread_pool()
            self.current = new
            if pin is not None:
                self.pinned = pin
            self.history.append(version)
            self.on_event("swapped", version)
            steps = ", ".join(f"{name} {b - a:.2f}s" for name, a, b in zip(STEPS, ends, ends[1:]))
            log.info("swapped to %s in %.2fs (%s)", version, ends[-1] - ends[0], steps)
            return new

    def offer(self, version: str) -> None:
        """An announced version: served unless pinned (a refusal is logged, not raised)."""
        if self.pinned:
            log.info("version %s announced; pinned to %s, not swapping", version, self.current.version)
            return
        if self._older_than_current(version):
            return
        try:
            self.switch_to(version, update=True)   # pinned and age checked again under the lock
        except Refused:
            pass

    def _older_than_current(self, version: str) -> bool:
        try:
            return model_store.version_number(version) <= model_store.version_number(self.current.version)
        except ValueError:
            return False

    def newest_servable(self) -> str | None:
        for v in reversed(self.store.versions()):
            if v not in self.refused:
                return v
        return None

    # admin operations
    def pin(self, version: str) -> ServedModel[Loaded]:
        return self.switch_to(version, pin=True)

    def unpin(self) -> ServedModel[Loaded]:
        with self.lock:
            self.pinned = False
        for v in reversed(self.store.versions()):
            if v in self.refused or self._older_than_current(v):
                continue
            try:
                return self.switch_to(v)
            except Refused:
                continue
        return self.current

    def rollback(self) -> ServedModel[Loaded]:
        """Back to the version served before the current one, pinned (so updates do not undo it).
        The version rolled back from leaves the history: a second rollback goes one further back
        (v0 v1 v2 -> v1 -> v0), not forth again to v2."""
        back = list(self.history)
        while back and back[-1] == self.current.version:
            back.pop()
        if not back:
            raise Refused(f"nothing to roll back to: {self.current.version} is the only version served")
        new = self.pin(back[-1])
        with self.lock:
            self.history = back     # ends with the version now served
        return new

    def list(self) -> list[dict]:
        out = []
        for v in self.store.versions():
            info = {"version": v, "serving": v == self.current.version, "verified": False, "refused_reason": "",
                    "created_unix_ms": 0}
            try:
                m = model_store.verify(self.store.path(v), self.part, self.verify_workers)
                info["verified"] = True
                info["created_unix_ms"] = int(m.get("created_unix_ms", 0))
            except model_store.CorruptCheckpoint as e:
                info["refused_reason"] = str(e)
            except (TypeError, ValueError):   # a verified manifest with an odd creation time: shown as 0
                pass
            info["refused_reason"] = self.refused.get(v, info["refused_reason"])
            out.append(info)
        return out


class UpdateWatcher:
    """Follows the model-updates topic from its end and offers each announced version."""

    def __init__(self, bootstrap: str, manager: VersionManager, client_id: str):
        self.bootstrap, self.manager, self.client_id = bootstrap, manager, client_id
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-updates", daemon=True)

    def start(self, timeout: float = 60.0) -> "UpdateWatcher":
        self._thread.start()
        self._ready.wait(timeout)
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            c = None
            try:
                c = KafkaConsumer(bootstrap_servers=self.bootstrap, client_id=self.client_id, group_id=None,
                                  enable_auto_commit=False)
                tp = TopicPartition(MODEL_UPDATES, 0)
                c.assign([tp])
                c.seek_to_end(tp)
                c.position(tp)
                self._ready.set()
                # the store may hold versions announced before we started following
                newest = self.manager.newest_servable()
                if newest:
                    self.manager.offer(newest)
                while not self._stop.is_set():
                    for recs in c.poll(timeout_ms=500).values():
                        for r in recs:
                            try:
                                upd = mpb.ModelUpdate.FromString(r.value)
                            except Exception as e:
                                log.warning("unreadable model update at offset %d: %s", r.offset, e)
                                continue
                            if upd.path and Path(upd.path).resolve().parent != self.manager.store.root.resolve():
                                log.info("ignoring %s: announced for another model store (%s)", upd.version, upd.path)
                                continue
                            self.manager.offer(upd.version)
            except Exception as e:
                log.warning("model-updates watcher: %s; retrying in 2s", e)
                self._ready.set()
                time.sleep(2)
            finally:   # a new consumer each try: the old one's sockets and threads go
                if c is not None:
                    with contextlib.suppress(Exception):   # closing must not end the watcher
                        c.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def add_admin_service(server, manager: VersionManager) -> None:
    """Registers rlhf.v1.AdminService (list / pin / unpin / rollback) for this manager."""
    class Admin(mgrpc.AdminServiceServicer):
        def _result(self, fn, context):
            try:
                cur = fn()
                return mpb.AdminResult(ok=True, serving=cur.version)
            except Refused as e:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            except ValueError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

        def ListVersions(self, request, context):
            return mpb.VersionList(versions=[mpb.VersionInfo(**v) for v in manager.list()],
                                   serving=manager.current.version, pinned=manager.pinned)

        def PinVersion(self, request, context):
            if not request.version:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "version: required")
            return self._result(lambda: manager.pin(request.version), context)

        def Unpin(self, request, context):
            return self._result(manager.unpin, context)

        def Rollback(self, request, context):
            return self._result(manager.rollback, context)

        def PauseTraining(self, request, context):
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "PauseTraining is served by the trainer, not this server")

    mgrpc.add_AdminServiceServicer_to_server(Admin(), server)
