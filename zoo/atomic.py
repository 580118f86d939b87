"""Atomic writes: a crash leaves the old file or folder, never a torn one, and zoo never replaces data it
did not write.

A folder written by `atomic_dir` carries `zoo-checksums.json`, the list of its files with their sizes and
SHA-256 digests. The list serves twice: `verify_dir` tells a file that changed after zoo wrote it, and
`atomic_dir` replaces an existing folder only when every file in it is on that list, so a file a person
put there is never deleted.

Temporary entries are named `.zoo-tmp.<name>.<random>`; the old folder displaced during a swap is
`.zoo-old.<name>`. Both prefixes mark zoo's own litter, which `clean_litter` removes (or, for an old folder
whose replacement never arrived, restores) after a crash.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from zoo.faults import fault_point

TMP_PREFIX = ".zoo-tmp."
OLD_PREFIX = ".zoo-old."
CHECKSUMS = "zoo-checksums.json"
_CHUNK = 1 << 20  # bytes read at a time when hashing
_SHOWN = 5  # names a refusal lists before "and N more"


class ForeignFilesError(ValueError):
    """An existing folder holds files zoo did not write, so zoo will not replace it."""


class ChecksumError(ValueError):
    """A file of a zoo-written folder is missing or changed after zoo wrote it."""


def _umask() -> int:
    """The process's umask (os.umask can only be read by setting it, so set it back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _follow_umask(folder: Path) -> None:
    """Give `folder` and everything in it the modes a plain mkdir/open would under the umask (libraries such
    as safetensors, and mkdtemp itself, create owner-only files)."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, names in os.walk(folder):
        for d in dirs:
            if not os.path.islink(os.path.join(root, d)):
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for name in names:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & 0o100
                os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def _is_litter(name: str) -> bool:
    return name.startswith(TMP_PREFIX) or name.startswith(OLD_PREFIX)


def _files(folder: Path) -> Iterator[str]:
    """Relative POSIX paths of everything under `folder` that is not a real folder (symlinks included)."""
    for root, dirs, names in os.walk(folder):
        here = Path(root)
        links = [d for d in dirs if (here / d).is_symlink()]
        dirs[:] = sorted(d for d in dirs if d not in links)
        for name in sorted(names + links):
            yield (here / name).relative_to(folder).as_posix()


def _sha256(path: Path, sync: bool = False) -> str:
    """SHA-256 of a file read in 1 MiB chunks; `sync` also flushes it to disk while it is open."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def folder_checksums(folder: str | os.PathLike, hashes: bool = True, sync: bool = False) -> dict:
    """The manifest of `folder`: {"files": {relative path: {"sha256", "bytes"}}}, the manifest itself left
    out.

    Without `hashes` only the sizes are listed (the list still records which files zoo wrote); a symbolic
    link is listed as {"link": target}; `sync` flushes each file to disk on the way.
    """
    folder = Path(folder)
    files = {}
    for rel in _files(folder):
        if rel == CHECKSUMS:
            continue
        path = folder / rel
        if path.is_symlink():
            files[rel] = {"link": os.readlink(path)}
            continue
        entry = {}
        if hashes:
            entry["sha256"] = _sha256(path, sync)
        elif sync:
            _fsync_path(path)
        entry["bytes"] = path.stat().st_size
        files[rel] = entry
    return {"files": files}


def _read_manifest(folder: Path) -> dict | None:
    """The `files` table of `folder`'s manifest; None when it has none; ChecksumError when it is
    unreadable."""
    manifest = folder / CHECKSUMS
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a table")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ChecksumError(f"{manifest}: unreadable ({err}); delete the folder and write it again") from err
    for rel in files:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ChecksumError(
                f"{manifest}: lists {rel!r}, a path outside the folder; delete the folder and write it again"
            )
    return files


def verify_dir(path: str | os.PathLike, required: bool = False) -> bool:
    """Check every file listed in `path`/zoo-checksums.json: present, same size, same SHA-256.

    Returns True when all match, False when the folder has no manifest (ChecksumError instead when
    `required`); the first file that fails raises ChecksumError naming it.
    """
    path = Path(path)
    files = _read_manifest(path)
    if files is None:
        if required:
            raise ChecksumError(
                f"{path}: no {CHECKSUMS}, so its files cannot be checked; write it again with this zoo"
            )
        return False
    for rel, entry in files.items():
        file = path / rel
        if "link" in entry:
            if not file.is_symlink():
                raise ChecksumError(f"{file}: missing (a symbolic link when zoo wrote it)")
            if os.readlink(file) != entry["link"]:
                raise ChecksumError(f"{file}: points to {os.readlink(file)}, written as {entry['link']}")
            continue
        if not file.is_file():
            raise ChecksumError(f"{file}: missing")
        size = file.stat().st_size
        if "bytes" in entry and size != entry["bytes"]:
            raise ChecksumError(f"{file}: size {size}, written as {entry['bytes']}")
        if "sha256" in entry and _sha256(file) != entry["sha256"]:
            raise ChecksumError(f"{file}: checksum mismatch (the file changed after zoo wrote it)")
    return True


def _foreign_files(path: Path, known: tuple[str, ...] = ()) -> list[str]:
    """Files under the existing folder `path` that its manifest does not list (zoo's litter excepted).

    A folder without a manifest (written by an older zoo) is foreign but for the file names in `known`.
    """
    files = _read_manifest(path) or dict.fromkeys(known)
    return [
        rel
        for rel in _files(path)
        if rel != CHECKSUMS and rel not in files and not any(map(_is_litter, rel.split("/")))
    ]


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive flock on `folder` itself: the swaps of its entries happen one at a time."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _swap(tmp: Path, path: Path, label: str, known: tuple[str, ...]) -> None:
    """Put the finished folder `tmp` at `path`, displacing a zoo-written folder there. Call under _locked."""
    old = path.with_name(OLD_PREFIX + path.name)
    if os.path.lexists(old):  # a crash mid-swap: the old folder left, the new one never arrived
        if not os.path.lexists(path):
            os.rename(old, path)
        else:
            shutil.rmtree(old)
    if os.path.lexists(path):
        if path.is_symlink() or not path.is_dir():
            raise ForeignFilesError(f"{path} is a file, not a folder zoo wrote; move it away, then run again")
        foreign = _foreign_files(path, known)
        if foreign:
            raise ForeignFilesError(
                f"{path} holds files zoo did not write ({_names(foreign)}); "
                "move them out of it, then run again"
            )
        os.rename(path, old)
        fault_point(f"swap:{label}")
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)  # a leftover is removed by the next swap or clean_litter
    else:
        os.rename(tmp, path)
    _fsync_path(path.parent)


@contextmanager
def atomic_dir(
    path: str | os.PathLike, checksums: bool = True, label: str | None = None, known: tuple[str, ...] = ()
) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; when the body succeeds it replaces `path` in one rename.

    The folder gets zoo-checksums.json (sizes only without `checksums`) and its files are flushed to disk
    before the rename. An existing `path` is replaced only when it is empty or holds nothing but the files
    its own manifest lists; otherwise ForeignFilesError and nothing changes. Concurrent writers of the same
    `path` take turns (a flock on the parent folder); on any failure the temporary folder is removed.
    `known`: the file names zoo writes there, which an older zoo wrote without a manifest (replaceable).
    `label` names the swap's fault point (default: the folder's name; see zoo.faults).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent))
    try:
        yield tmp
        manifest = folder_checksums(tmp, hashes=checksums, sync=True)
        with open(tmp / CHECKSUMS, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _follow_umask(tmp)
        _fsync_path(tmp)
        fault_point(f"write:{label or path.name}")  # written in full, not yet in place
        with _locked(path.parent):
            _swap(tmp, path, label or path.name, known)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w"):
    """Yield a temporary file object beside `path`; when the body succeeds it replaces `path` in one
    rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON to `path`, atomically."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


def clean_litter(folder: str | os.PathLike, depth: int = 3) -> list[Path]:
    """Remove zoo's crash litter in `folder` and its sub-folders down to `depth` levels; return what it
    handled.

    A `.zoo-tmp.*` entry (an unfinished write) is removed. A `.zoo-old.<name>` folder (the old copy displaced
    by a swap) is renamed back to `<name>` when `<name>` is missing (the crash came mid-swap), else removed.
    Folders whose name starts with "." are not entered, and nothing else is touched. Call it only while
    holding the run folder's lock: another writer's temporary entries look the same.
    """
    folder = Path(folder)
    handled = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if name.startswith(TMP_PREFIX):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            handled.append(entry)
        elif name.startswith(OLD_PREFIX) and len(name) > len(OLD_PREFIX):
            original = folder / name[len(OLD_PREFIX) :]
            if os.path.lexists(original):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            else:
                os.rename(entry, original)
            handled.append(entry)
    if depth > 0:
        for entry in sorted(folder.iterdir()):
            if entry.is_dir() and not entry.is_symlink() and not entry.name.startswith("."):
                handled += clean_litter(entry, depth - 1)
    return handled
