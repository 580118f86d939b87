"""zoo's C kernels for the CPU (zoo/kernels/csrc/*.c): compiled on first use, loaded with ctypes.

A C kernel is an optional fast path: where it cannot be built, the caller runs its PyTorch form and
says nothing is lost but speed. `library(name)` compiles csrc/<name>.c with the system's C compiler
(`$CC`, else cc, gcc or clang; -O3 -march=native, OpenMP where the compiler has it) into
`$ZOO_CACHE/native/<key>/` once per source (and csrc's headers), compiler, flags and CPU (the key hashes
them), writing the
shared object under a temporary name and renaming it into place, so a process that reads it never sees
half a file. It returns the loaded library, or None where the compiler is missing or fails (the reason is
kept: `unavailable_reason(name)`), while `disabled()` is active, or where the environment says
ZOO_NATIVE=off when the kernel is first asked for (for a user who wants no compiler run, or to measure
what the kernels buy from the shell).

No torch import: this module only builds and loads.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from zoo.paths import cache_dir

__all__ = [
    "ENV_VAR",
    "SOURCES",
    "disabled",
    "find_compiler",
    "function",
    "library",
    "status",
    "unavailable_reason",
]

ENV_VAR = "ZOO_NATIVE"

SOURCES = Path(__file__).parent / "csrc"
BASE_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno")
OPENMP_FLAGS = ("-fopenmp",)
COMPILE_SECONDS = 120

_loaded: dict[str, ctypes.CDLL | None] = {}
_reasons: dict[str, str] = {}
_disabled = 0


@contextmanager
def disabled() -> Iterator[None]:
    """Within the block `library` returns None: every caller takes its PyTorch form (for comparisons and
    for measuring what the C kernels buy). Nests; the previous state comes back after the block."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


def find_compiler() -> str | None:
    """The C compiler `library` uses: $CC, else the first of cc, gcc and clang on PATH; None: none."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and its CPU flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}"


def _build(source: Path, compiler: str, out_dir: Path) -> tuple[Path | None, str]:
    """Compile `source` into out_dir (OpenMP first, then without); (the shared object, or None, and the
    compiler's last complaint)."""
    target = out_dir / f"lib{source.stem}.so"
    if target.is_file():
        return target, ""
    complaint = ""
    for extra in (OPENMP_FLAGS, ()):
        fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=out_dir)
        os.close(fd)
        cmd = [compiler, *BASE_FLAGS, *extra, str(source), "-o", tmp, "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_SECONDS)
        except (OSError, subprocess.TimeoutExpired) as err:
            done, complaint = None, str(err)
        if done is not None and done.returncode == 0:
            os.replace(tmp, target)
            return target, ""
        if done is not None:
            complaint = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        Path(tmp).unlink(missing_ok=True)
    return None, complaint


def _off_by_env() -> bool:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value not in ("", "on", "off"):
        raise ValueError(f"{ENV_VAR}={value!r} is not a setting; choose on or off")
    return value == "off"


def library(name: str) -> ctypes.CDLL | None:
    """The compiled csrc/<name>.c, loaded (once per process), or None (see the module docstring)."""
    if _disabled:
        return None
    if name in _loaded:  # ZOO_NATIVE is read when a kernel is first asked for, not at every call
        return _loaded[name]
    if _off_by_env():
        _reasons[name], _loaded[name] = f"off ({ENV_VAR}=off)", None
        return None
    source = SOURCES / f"{name}.c"
    if not source.is_file():
        raise ValueError(f"no C kernel named {name!r} in {SOURCES}")
    lib = None
    compiler = find_compiler()
    if compiler is None:
        _reasons[name] = "no C compiler found ($CC, cc, gcc or clang)"
    else:
        headers = [path.read_text() for path in sorted(SOURCES.glob("*.h"))]  # what a source may include
        flags = " ".join(BASE_FLAGS + OPENMP_FLAGS)
        parts = [source.read_text(), *headers, compiler, flags, _cpu_signature()]
        key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
        path, complaint = _build(source, compiler, cache_dir("native", key))
        if path is None:
            _reasons[name] = f"{compiler} could not build {source.name}: {complaint}"
        else:
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as err:
                _reasons[name] = f"could not load {path}: {err}"
    _loaded[name] = lib
    return lib


def function(name: str, entry: str, argtypes: list, restype=ctypes.c_int):
    """The C function `entry` of csrc/<name>.c with its argument and result types set (once), or None where
    that library is not available (see `library`)."""
    lib = library(name)
    if lib is None:
        return None
    fn = getattr(lib, entry)
    if fn.argtypes is None:
        fn.argtypes, fn.restype = argtypes, restype
    return fn


def unavailable_reason(name: str) -> str | None:
    """Why csrc/<name>.c is not in use in this process (None: loaded, or not asked for yet)."""
    if _disabled:
        return "disabled (zoo.kernels.native.disabled)"
    return _reasons.get(name)


def status() -> dict[str, str]:
    """Every C kernel (csrc/*.c), built and loaded if it can be: "in use", or why not (for bench reports)."""
    names = sorted(path.stem for path in SOURCES.glob("*.c"))
    return {name: "in use" if library(name) is not None else unavailable_reason(name) for name in names}
