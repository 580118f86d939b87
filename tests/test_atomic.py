"""zoo.atomic: a folder or file is replaced whole or not at all, never over files zoo did not write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import zoo.atomic
from zoo.atomic import (
    CHECKSUMS,
    OLD_PREFIX,
    TMP_PREFIX,
    ChecksumError,
    ForeignFilesError,
    atomic_dir,
    atomic_file,
    clean_litter,
    folder_checksums,
    verify_dir,
    write_json,
)

# Subprocesses import zoo's stdlib-only modules through a bare package, skipping zoo/__init__ (torch).
BARE_ZOO = (
    f"import sys, types; zoo = types.ModuleType('zoo'); zoo.__path__ = "
    f"[{str(Path(zoo.atomic.__file__).parent)!r}]; zoo.__version__ = 'test'; sys.modules['zoo'] = zoo\n"
)


def write_folder(path: Path, files: dict[str, bytes], **kwargs) -> None:
    with atomic_dir(path, **kwargs) as tmp:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def litter(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.startswith((TMP_PREFIX, OLD_PREFIX))]


def test_replaces_folder_and_leaves_no_temp(tmp_path):
    target = tmp_path / "ckpt"
    write_folder(target, {"a.bin": b"first", "sub/b.bin": b"1"})
    write_folder(target, {"a.bin": b"second"})
    assert tree(target) == {"a.bin": b"second", CHECKSUMS: (target / CHECKSUMS).read_bytes()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_body_keeps_old_folder_and_removes_temp(tmp_path):
    target = tmp_path / "ckpt"
    write_folder(target, {"a.bin": b"first"})
    before = tree(target)
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(target) as tmp:
        (tmp / "a.bin").write_bytes(b"half")
        raise RuntimeError("boom")
    assert tree(target) == before
    assert litter(tmp_path) == []


def test_refuses_to_replace_a_folder_holding_foreign_files(tmp_path):
    target = tmp_path / "ckpt"
    write_folder(target, {"a.bin": b"zoo's"})
    (target / "important.txt").write_text("mine")
    (target / "sub").mkdir()
    (target / "sub" / "x.bin").write_bytes(b"mine too")
    before = tree(target)
    with pytest.raises(
        ForeignFilesError, match=r"holds files zoo did not write \(important.txt, sub/x.bin\)"
    ):
        write_folder(target, {"a.bin": b"new"})
    assert tree(target) == before
    assert litter(tmp_path) == []


def test_refuses_a_folder_without_manifest_but_replaces_an_empty_one(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for i in range(7):
        (foreign / f"f{i}.txt").write_text("x")
    with pytest.raises(ForeignFilesError, match=r"f4.txt and 2 more\); move them out of it, then run again"):
        write_folder(foreign, {"a.bin": b"new"})
    assert len(list(foreign.iterdir())) == 7

    empty = tmp_path / "empty"
    empty.mkdir()
    write_folder(empty, {"a.bin": b"new"})
    assert verify_dir(empty, required=True)


def test_manifest_verifies_and_names_the_damaged_file(tmp_path):
    target = tmp_path / "ckpt"
    write_folder(target, {"trainable.safetensors": bytes(range(200)), "sub/c.json": b"{}"})
    manifest = json.loads((target / CHECKSUMS).read_text())
    assert manifest == folder_checksums(target)
    assert manifest["files"]["trainable.safetensors"]["bytes"] == 200
    assert verify_dir(target) is True

    data = bytearray((target / "trainable.safetensors").read_bytes())
    data[17] ^= 1
    (target / "trainable.safetensors").write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"trainable.safetensors: checksum mismatch \(the file changed"):
        verify_dir(target)

    (target / "trainable.safetensors").write_bytes(bytes(range(100)))
    with pytest.raises(ChecksumError, match="trainable.safetensors: size 100, written as 200"):
        verify_dir(target)

    (target / "trainable.safetensors").unlink()
    with pytest.raises(ChecksumError, match="trainable.safetensors: missing"):
        verify_dir(target)


def test_verify_dir_without_manifest(tmp_path):
    assert verify_dir(tmp_path) is False
    with pytest.raises(ChecksumError, match="no zoo-checksums.json"):
        verify_dir(tmp_path, required=True)


def test_without_checksums_the_manifest_still_lists_the_files(tmp_path):
    target = tmp_path / "data"
    write_folder(target, {"a.bin": b"abc"}, checksums=False)
    assert json.loads((target / CHECKSUMS).read_text()) == {"files": {"a.bin": {"bytes": 3}}}
    write_folder(target, {"b.bin": b"abcd"}, checksums=False)  # its own output is replaceable
    assert verify_dir(target, required=True)
    assert sorted(p.name for p in target.iterdir()) == ["b.bin", CHECKSUMS]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_permissions_follow_the_umask(tmp_path, umask_022):
    write_folder(tmp_path / "ckpt", {"a.bin": b"x"})
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "ckpt" / CHECKSUMS).stat().st_mode & 0o777 == 0o644
    with atomic_file(tmp_path / "f.bin", "wb") as f:
        f.write(b"x")
    write_json(tmp_path / "p.json", {"step": 3})
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "p.json").stat().st_mode & 0o777 == 0o644
    assert json.loads((tmp_path / "p.json").read_text()) == {"step": 3}


def test_atomic_file_keeps_old_file_on_failure(tmp_path):
    write_json(tmp_path / "p.json", {"step": 1})
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "p.json") as f:
        f.write("{torn")
        raise RuntimeError("crash")
    assert json.loads((tmp_path / "p.json").read_text()) == {"step": 1}
    assert litter(tmp_path) == []


def crash_mid_swap(parent: Path) -> Path:
    """The state a crash between the two renames of a swap leaves: only .zoo-old.x."""
    write_folder(parent / "x", {"a.bin": b"old"})
    os.rename(parent / "x", parent / f"{OLD_PREFIX}x")
    return parent / "x"


def test_atomic_dir_recovers_a_crash_mid_swap(tmp_path):
    target = crash_mid_swap(tmp_path)
    write_folder(target, {"a.bin": b"new"})
    assert (target / "a.bin").read_bytes() == b"new"
    assert litter(tmp_path) == []


def test_clean_litter_restores_a_crash_mid_swap(tmp_path):
    target = crash_mid_swap(tmp_path / "checkpoints")
    assert clean_litter(tmp_path) == [tmp_path / "checkpoints" / f"{OLD_PREFIX}x"]
    assert (target / "a.bin").read_bytes() == b"old"
    assert verify_dir(target, required=True)


def test_clean_litter_removes_only_zoo_litter_down_to_depth(tmp_path):
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    litter_paths = [
        tmp_path / f"{TMP_PREFIX}f.1",
        tmp_path / "a" / f"{TMP_PREFIX}d.2",
        deep / f"{TMP_PREFIX}g.3",
    ]
    litter_paths[0].write_text("torn")
    litter_paths[1].mkdir()
    (litter_paths[1] / "inner.bin").write_bytes(b"x")
    litter_paths[2].write_text("torn")
    (tmp_path / "a" / "kept").mkdir()
    stale_old = tmp_path / "a" / f"{OLD_PREFIX}kept"
    stale_old.mkdir()
    too_deep = deep / "d" / f"{TMP_PREFIX}h.4"
    too_deep.parent.mkdir()
    too_deep.write_text("beyond depth 3")
    kept = [
        tmp_path / ".zoo-lock",
        tmp_path / ".hidden" / f"{TMP_PREFIX}i.5",
        tmp_path / "a" / ".zoo-tmpfile",
        tmp_path / "a" / "zoo-tmp.x",
        too_deep,
    ]
    for path in kept[:4]:
        path.parent.mkdir(exist_ok=True)
        path.write_text("not litter")

    handled = clean_litter(tmp_path, depth=3)
    assert sorted(handled) == sorted(litter_paths + [stale_old])
    assert not any(os.path.lexists(p) for p in litter_paths + [stale_old])
    assert all(p.exists() for p in kept) and (tmp_path / "a" / "kept").is_dir()


WRITER = (
    BARE_ZOO
    + """
import os
from zoo.atomic import atomic_dir
target, rounds = sys.argv[1], int(sys.argv[2])
for i in range(rounds):
    with atomic_dir(target) as tmp:
        for k in range(3):
            (tmp / f"part{k}.bin").write_bytes(os.urandom(512))
        (tmp / "sub").mkdir()
        (tmp / "sub" / "who.txt").write_text(f"{os.getpid()} {i}")
"""
)


def test_concurrent_writers_never_crash_and_leave_one_complete_folder(tmp_path):
    target = tmp_path / "ckpt"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(target), "150"], stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for writer in writers:
        _, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, err
    assert verify_dir(target, required=True)
    assert sorted(tree(target)) == sorted([CHECKSUMS, "part0.bin", "part1.bin", "part2.bin", "sub/who.txt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
