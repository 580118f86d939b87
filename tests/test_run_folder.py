"""zoo.run_folder: zoo writes only into new, empty or its own folders, and one run at a time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import zoo.run_folder
from zoo.run_folder import (
    LOCK,
    MARKER,
    RunFolderError,
    check_out_folder,
    claim_run_folder,
    read_lock_holder,
)

# Subprocesses import zoo's stdlib-only modules through a bare package, skipping zoo/__init__ (torch).
BARE_ZOO = (
    f"import sys, types; zoo = types.ModuleType('zoo'); zoo.__path__ = "
    f"[{str(Path(zoo.run_folder.__file__).parent)!r}]; zoo.__version__ = 'test'; "
    "sys.modules['zoo'] = zoo\n"
)


def snapshot(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_a_fresh_path_is_created_marked_and_locked(tmp_path):
    out = tmp_path / "runs" / "r1"
    with claim_run_folder(out) as lock:
        assert lock.locked
        marker = json.loads((out / MARKER).read_text())
        assert set(marker) == {"zoo_version", "created"}
        assert read_lock_holder(out)["pid"] == os.getpid()
    assert not lock.locked
    assert sorted(p.name for p in out.iterdir()) == [LOCK, MARKER]


def test_an_empty_folder_is_accepted(tmp_path):
    with claim_run_folder(tmp_path):
        assert (tmp_path / MARKER).is_file()


def test_a_foreign_folder_is_refused_and_left_untouched(tmp_path):
    (tmp_path / "a.txt").write_text("mine")
    (tmp_path / "b").mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(
        RunFolderError,
        match=r"is not empty and was not made by zoo \(it holds a.txt, b/\); "
        "choose a new or empty folder",
    ):
        claim_run_folder(tmp_path)
    assert snapshot(tmp_path) == before


def test_a_foreign_folder_that_has_recipe_yaml_is_still_refused(tmp_path):
    (tmp_path / "recipe.yaml").write_text("")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="it holds notes.txt, recipe.yaml"):
        check_out_folder(tmp_path)


def test_a_run_folder_of_an_older_zoo_is_accepted(tmp_path):
    (tmp_path / "recipe.yaml").write_text("model: x\n")
    (tmp_path / "progress.json").write_text("{}")
    (tmp_path / "model").mkdir()
    with claim_run_folder(tmp_path):
        assert (tmp_path / MARKER).is_file()


def test_out_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        claim_run_folder(tmp_path / "f")


def test_out_under_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunFolderError, match=f"its parent {tmp_path / 'f'} is a file"):
        claim_run_folder(tmp_path / "f" / "run")


def test_out_in_a_read_only_parent(tmp_path, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: make os.access say what it would for a user
        real_access = os.access
        monkeypatch.setattr(
            zoo.run_folder.os, "access", lambda p, mode: False if Path(p) == parent else real_access(p, mode)
        )
    else:
        parent.chmod(0o555)
    try:
        with pytest.raises(RunFolderError, match=f"no permission to write in {parent}"):
            claim_run_folder(parent / "run")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


HOLDER = (
    BARE_ZOO
    + """
import pathlib, time
from zoo.run_folder import claim_run_folder
lock = claim_run_folder(sys.argv[1])
pathlib.Path(sys.argv[2]).write_text("locked")
time.sleep(120)
"""
)


def test_a_folder_in_use_is_refused_until_its_run_dies(tmp_path):
    out, signal_file = tmp_path / "run", tmp_path / "holding"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(signal_file)])
    try:
        deadline = time.monotonic() + 30
        while not signal_file.exists():
            assert holder.poll() is None, "the lock holder exited early"
            assert time.monotonic() < deadline, "the lock holder never took the lock"
            time.sleep(0.05)
        with pytest.raises(
            RunFolderError,
            match=rf"{out} is in use by another zoo run \(pid {holder.pid} on "
            r"host .+; wait for it to finish or use another --out",
        ):
            claim_run_folder(out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert read_lock_holder(out)["pid"] == holder.pid  # the dead run's lock file is still there
    with claim_run_folder(out):
        assert read_lock_holder(out)["pid"] == os.getpid()
