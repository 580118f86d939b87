"""`zoo list` from the mixer catalog: the registry's own attributes, read back without torch once cached."""

from __future__ import annotations

import os
import subprocess
import sys

import zoo
from zoo.catalog import FIELDS, catalog_key, mixer_catalog


def test_the_catalog_is_the_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    rows = mixer_catalog()
    assert [row["name"] for row in rows] == zoo.list_mixers()
    for row in rows:
        cls = zoo.get_mixer(row["name"])
        assert all(row[field] == getattr(cls, field) for field in FIELDS)
    assert len(list((tmp_path / "catalog").glob("mixers-*.json"))) == 1
    assert mixer_catalog() == rows


def test_a_warm_catalog_lists_without_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    rows = mixer_catalog()  # built here, where the mixers are imported already
    code = (
        "import sys; from zoo.cli import main; main(['list']); print('torch loaded:', 'torch' in sys.modules)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("torch loaded: False")
    listed = [line.split()[0] for line in run.stdout.splitlines()[1:-1]]
    assert listed == [row["name"] for row in rows] == zoo.list_mixers()


def test_a_changed_mixer_file_changes_the_key(tmp_path):
    folder = tmp_path / "mixers"
    folder.mkdir()
    (folder / "a.py").write_text("x = 1\n")
    before = catalog_key(folder)
    (folder / "a.py").write_text("x = 22\n")
    assert catalog_key(folder) != before
