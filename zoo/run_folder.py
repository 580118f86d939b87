"""The run folder (`zoo run --out`): checking it is safe to write, its marker, and its lock.

A folder zoo made carries MARKER (.zoo-run), so zoo recognizes its own folders and refuses to write into
any other non-empty one. A run holds an exclusive flock on LOCK (.zoo-lock) for its whole life, so two runs
never write the same folder at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from datetime import datetime
from pathlib import Path

from zoo.atomic import OLD_PREFIX, TMP_PREFIX, write_json

MARKER = ".zoo-run"
LOCK = ".zoo-lock"
_SHOWN = 5  # names a refusal lists before "and N more"

# What a run folder made by zoo holds at its top level (and names starting with TMP_PREFIX or OLD_PREFIX).
ZOO_RUN_FILES = frozenset(
    {
        "recipe.yaml",
        "progress.json",
        "metrics.jsonl",
        "summary.json",
        "checkpoints",
        "model",
        "adapter",
        "store",
        "blocks",
        "stage1",
        "references",
        "superseded",
        MARKER,
        LOCK,
    }
)


class RunFolderError(ValueError):
    """The run folder cannot be used: not zoo's, not writable, or in use by another run."""


def is_zoo_run_entry(name: str) -> bool:
    """Whether a top-level entry of that name may be in a run folder made by zoo."""
    return name in ZOO_RUN_FILES or name.startswith(TMP_PREFIX) or name.startswith(OLD_PREFIX)


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _shown(names: list[str]) -> str:
    text = ", ".join(names[:_SHOWN])
    return text + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def check_out_folder(out: str | os.PathLike) -> None:
    """Raise RunFolderError when `out` cannot be a run folder; touch nothing.

    Accepted: a missing folder whose nearest existing ancestor is a writable folder, an empty folder, a
    folder with MARKER or LOCK (claimed by a zoo run, which takes the lock before writing the marker), and a
    run folder written by an older zoo (recipe.yaml and nothing zoo would not
    write). Refused: a file, a path under a file, a folder without write permission, any other folder.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file, not a folder; choose a folder")
    existing = out.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != out.absolute() and not existing.is_dir():
        raise RunFolderError(f"--out {out}: its parent {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunFolderError(f"--out {out}: no permission to write in {existing}")
    if existing != out.absolute():
        return
    try:
        entries = sorted(os.scandir(out), key=lambda e: e.name)
    except OSError as err:
        raise RunFolderError(f"--out {out}: cannot list it ({err.strerror}); choose another folder") from err
    names = [e.name for e in entries]
    if not names or MARKER in names or LOCK in names:  # a lock: another zoo run is claiming it right now
        return
    if "recipe.yaml" in names and all(map(is_zoo_run_entry, names)):
        return  # a run folder written before zoo marked its folders
    shown = [e.name + "/" if e.is_dir() else e.name for e in entries]
    raise RunFolderError(
        f"--out {out} is not empty and was not made by zoo (it holds {_shown(shown)}); "
        "choose a new or empty folder"
    )


def read_lock_holder(out: str | os.PathLike) -> dict | None:
    """The run that holds (or, after a crash, last held) `out`'s lock: {"host", "pid", "started"}, or None."""
    try:
        holder = json.loads((Path(out) / LOCK).read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


class RunLock:
    """An exclusive, non-blocking flock on `out`/.zoo-lock, held from construction until `release`.

    The lock file names its holder (host, pid, start time) for the message another run gets. The lock
    belongs to the open file, not to the file on disk: it dies with its process however that process ends,
    so a lock file left by a killed run is harmless and the next run simply takes it over. Use it as a
    context manager, or call `release`.
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = self.out / LOCK
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderError(
                f"{self.out} is in use by another zoo run{self._holder()}; "
                "wait for it to finish or use another --out"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            holder = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": _now()})
            os.ftruncate(fd, 0)
            os.pwrite(fd, (holder + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd

    def _holder(self) -> str:
        holder = read_lock_holder(self.out)
        if not holder:
            return ""
        return f" (pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')})"

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Empty the lock file and drop the lock; calling it again does nothing."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_run_folder(out: str | os.PathLike) -> RunLock:
    """Check `out`, create it, lock it and mark it as zoo's; return the held lock (release it when done)."""
    out = Path(out)
    check_out_folder(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out)
    except (PermissionError, NotADirectoryError, FileExistsError) as err:
        raise RunFolderError(
            f"--out {out}: cannot create or lock it ({err.strerror}); choose a folder you can write"
        ) from err
    try:
        if not (out / MARKER).exists():
            from zoo import __version__

            write_json(out / MARKER, {"zoo_version": __version__, "created": _now()})
    except PermissionError as err:
        lock.release()
        raise RunFolderError(
            f"--out {out}: cannot write {MARKER} ({err.strerror}); choose a folder you can write"
        ) from err
    except BaseException:
        lock.release()
        raise
    return lock
