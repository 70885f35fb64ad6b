"""The versioned model store: the one place checkpoints are published and verified.

Layout: <root>/<version>/{manifest.json, policy/..., rm/...}. A version is written into
<root>/.tmp-<version>-<pid>, every file and directory fsynced, the manifest (sha256 of every
file, parent version, metrics, the Kafka offsets it was trained on) written last, then the
folder is renamed into place and the root fsynced. A crash at any point leaves either no
<version> folder or a complete one; leftover .tmp-* folders are never read and are swept.
Readers (servers, the trainer on restart) call `verify` before loading: a file whose sha256
does not match, a missing file or an unreadable manifest refuses the version. Files over 64 MiB also
have a sha256 per 64 MiB piece, so a server can check them on several cores; a server checks the
part of the version it loads (policy/ or rm/), the trainer all of it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .durable import fsync_dir, fsync_tree

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
VERSION_RE = re.compile(r"^v(\d{4,})$")


class CorruptCheckpoint(Exception):
    """A version folder whose manifest is missing, unreadable or does not match its files."""


def version_name(n: int) -> str:
    return f"v{n:04d}"


def version_number(name: str) -> int:
    m = VERSION_RE.match(name)
    if not m:
        raise ValueError(f"not a version name: {name!r} (expected v0001, v0002, ...)")
    return int(m.group(1))


PIECE_BYTES = 64 << 20
"""Files over this size also get a sha256 per piece of this size in the manifest ("pieces"), so a
reader can check one file's pieces on several cores (sha256 itself is sequential: ~1.2 GB/s a core
here, 0.3 s for a GPT-2-small policy, on a hot swap's critical path)."""


def hash_pieces(path: Path, piece: int = PIECE_BYTES, chunk: int = 1 << 20) -> tuple[str, list[str]]:
    """One read of the file: the sha256 of all of it and of each `piece` bytes ([] for a file of at
    most one piece)."""
    whole, pieces = hashlib.sha256(), []
    with open(path, "rb") as f:
        while True:
            h, n = hashlib.sha256(), 0
            while n < piece and (b := f.read(min(chunk, piece - n))):
                whole.update(b)
                h.update(b)
                n += len(b)
            if n:
                pieces.append(h.hexdigest())
            if n < piece:
                break
    return whole.hexdigest(), pieces if len(pieces) > 1 else []


def sha256_range(path: Path, offset: int = 0, length: int = -1, chunk: int = 1 << 20) -> str:
    """The sha256 of `length` bytes of the file from `offset` (-1: to its end)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while length and (b := f.read(chunk if length < 0 else min(chunk, length))):
            h.update(b)
            if length > 0:
                length -= len(b)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


class ModelStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def versions(self) -> list[str]:
        """Published version names, oldest first (only complete folders: temp folders are skipped)."""
        out = [p.name for p in self.root.iterdir() if p.is_dir() and VERSION_RE.match(p.name)]
        return sorted(out, key=version_number)

    def latest(self) -> str | None:
        v = self.versions()
        return v[-1] if v else None

    def path(self, version: str) -> Path:
        version_number(version)  # refuses names like ../x
        return self.root / version

    def manifest(self, version: str) -> dict:
        return read_manifest(self.path(version))

    def next_version(self) -> str:
        v = self.latest()
        return version_name(0 if v is None else version_number(v) + 1)

    def publish(self, version: str, write_files, parent: str | None, metrics: dict, offsets: dict,
                extra: dict | None = None) -> Path:
        """write_files(tmp_dir) writes the checkpoint's files; then hashes, manifest, fsync, rename.
        Returns the published folder. Refuses to overwrite an existing version."""
        final = self.path(version)
        if final.exists():
            raise FileExistsError(f"{final} already exists: versions are immutable")
        self.sweep()
        tmp = self.root / f".tmp-{version}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_files(tmp)
        files, pieces = {}, {}
        for f in _files(tmp):
            files[f], p = hash_pieces(tmp / f, PIECE_BYTES)
            if p:
                pieces[f] = p
        manifest = {"version": version, "parent": parent, "created_unix_ms": int(time.time() * 1000),
                    "files": files, "pieces": pieces, "piece_bytes": PIECE_BYTES, "metrics": metrics,
                    "offsets": offsets, **(extra or {})}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        fsync_tree(tmp)
        os.rename(tmp, final)   # atomic on one filesystem: readers see all of it or nothing
        fsync_dir(self.root)
        return final

    def newest_verified(self) -> tuple[str, dict]:
        """The newest version whose files match its manifest, and that manifest (corrupt newer
        ones are logged and skipped). Raises CorruptCheckpoint if none verifies."""
        for v in reversed(self.versions()):
            try:
                return v, verify(self.path(v))
            except CorruptCheckpoint as e:
                log.error("skipping version %s: %s", v, e)
        raise CorruptCheckpoint(f"no verified version in the model store {self.root}")

    def sweep(self) -> None:
        """Removes temp folders a crashed publisher left behind (this process's own included)."""
        for p in self.root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def read_manifest(folder: Path) -> dict:
    try:
        m = json.loads((Path(folder) / MANIFEST).read_text())
    except FileNotFoundError as e:
        raise CorruptCheckpoint(f"{folder}: no {MANIFEST} (incomplete checkpoint)") from e
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(f"{folder}: unreadable {MANIFEST}: {e}") from e
    if not isinstance(m, dict) or not isinstance(m.get("files"), dict) or "version" not in m:
        raise CorruptCheckpoint(f"{folder}: {MANIFEST} lacks version/files")
    return m


def verify(folder: str | os.PathLike, part: str | None = None, workers: int = 1) -> dict:
    """Checks the version's files against the manifest's sha256 (and that no listed file is missing):
    all of them, or those under `part`/ (the one subfolder a server loads: "policy", "rm"). With the
    manifest's per-piece digests, a large file's pieces are hashed on `workers` threads (hashlib
    releases the GIL); each byte is still checked against a sha256 the publisher wrote. Returns the
    manifest; raises CorruptCheckpoint naming the first problem."""
    folder = Path(folder)
    m = read_manifest(folder)
    if m["version"] != folder.name:
        raise CorruptCheckpoint(f"{folder}: manifest says version {m['version']!r}")
    rels = [r for r in m["files"] if part is None or r.startswith(part.strip("/") + "/")]
    if not rels:
        raise CorruptCheckpoint(f"{folder}: the manifest lists no file under {part}/")
    jobs: list[tuple[str, int, int, str]] = []   # (file, offset, length or -1 for all of it, sha256)
    for rel in rels:
        p = folder / rel
        if not p.is_file():
            raise CorruptCheckpoint(f"{folder}: {rel} is missing")
        pieces, size = m.get("pieces", {}).get(rel), p.stat().st_size
        if not pieces:
            jobs.append((rel, 0, -1, m["files"][rel]))
            continue
        piece = m.get("piece_bytes")
        if not isinstance(piece, int) or piece <= 0 or not isinstance(pieces, list):
            raise CorruptCheckpoint(f"{folder}: {MANIFEST} has pieces for {rel} without a valid piece_bytes")
        if -(-size // piece) != len(pieces):
            raise CorruptCheckpoint(f"{folder}: {rel} does not match its sha256 (size {size})")
        jobs += [(rel, i * piece, piece, d) for i, d in enumerate(pieces)]

    def matches(job: tuple[str, int, int, str]) -> bool:
        rel, offset, length, digest = job
        return sha256_range(folder / rel, offset, length) == digest

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for (rel, *_), ok in zip(jobs, pool.map(matches, jobs)):
            if not ok:
                raise CorruptCheckpoint(f"{folder}: {rel} does not match its sha256")
    return m
