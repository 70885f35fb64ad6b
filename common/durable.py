"""Durable folder writes: fsync a written tree, and replace a folder by a fully written one.

A folder is written under a temporary name beside its destination, every file and directory is
fsynced, and only then renamed into place (rename is atomic on one filesystem), so a crash leaves
the old folder or the new one, never a half-written one.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under root, then every directory (their entries)."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(Path(dirpath) / f, "rb") as fh:   # fsync needs no write access
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


def _old_name(dest: Path) -> Path:
    return dest.with_name(dest.name + ".replaced")


def recover(dest: Path) -> None:
    """Finishes a replace_dir a crash interrupted between its two renames: the old folder, renamed
    aside, goes back when nothing took its place."""
    old = _old_name(dest)
    if old.exists() and not dest.exists():
        os.rename(old, dest)
        fsync_dir(dest.parent)
    shutil.rmtree(old, ignore_errors=True)


def replace_dir(tmp: Path, dest: Path) -> None:
    """Makes the fully written folder `tmp` (beside dest) the folder `dest`. Linux cannot rename a
    folder over a non-empty one, so dest is first renamed aside: a crash between the two renames
    leaves dest missing and its old copy at `<dest>.replaced`, which `recover` puts back."""
    fsync_tree(tmp)
    recover(dest)
    if dest.exists():
        os.rename(dest, _old_name(dest))
    os.rename(tmp, dest)
    fsync_dir(dest.parent)
    shutil.rmtree(_old_name(dest), ignore_errors=True)
