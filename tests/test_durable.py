"""common.durable: a folder is replaced whole, and a crash between replace_dir's renames is undone."""
from __future__ import annotations

import os

import pytest

from common.durable import recover, replace_dir


def _folder(path, **files):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_replace_dir_swaps_in_the_new_folder_and_leaves_nothing_behind(tmp_path):
    dest = _folder(tmp_path / "model", a="old", b="old")
    tmp = _folder(tmp_path / "model.tmp", a="new")
    replace_dir(tmp, dest)
    assert sorted(os.listdir(tmp_path)) == ["model"]
    assert {p.name: p.read_text() for p in dest.iterdir()} == {"a": "new"}


def test_replace_dir_creates_a_missing_destination(tmp_path):
    replace_dir(_folder(tmp_path / "t", a="x"), tmp_path / "model")
    assert (tmp_path / "model" / "a").read_text() == "x"


def test_a_crash_between_the_renames_is_recovered(tmp_path, monkeypatch):
    dest = _folder(tmp_path / "model", a="old")
    tmp = _folder(tmp_path / "model.tmp", a="new")
    real_rename, calls = os.rename, []

    def crash_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("power cut")
        real_rename(src, dst)
    monkeypatch.setattr(os, "rename", crash_on_second)
    with pytest.raises(OSError):
        replace_dir(tmp, dest)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not dest.exists() and (tmp_path / "model.replaced").exists()
    recover(dest)   # what the next writer (or reader) does first
    assert (dest / "a").read_text() == "old" and not (tmp_path / "model.replaced").exists()
