"""zoo.kernels.native: C kernels built on first use into the zoo cache, loaded with ctypes; a missing or
failing compiler means None and a reason (the callers then run their PyTorch forms); `disabled()`."""

from __future__ import annotations

import ctypes

import pytest

from zoo.kernels import native


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty zoo cache and no library loaded yet in this process."""
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_reasons", {})
    return tmp_path


KERNELS = (
    "decode_glue",
    "delta_step",
    "gate_fold",
    "gate_grad",
    "hedgehog_features",
    "hedgehog_rows",
    "linear_step",
    "low_rank_gate",
    "sparse_decode",
    "window_decode",
)
needs_compiler = pytest.mark.skipif(native.find_compiler() is None, reason="no C compiler on this machine")


@needs_compiler
def test_a_kernel_is_built_once_into_the_cache_and_loaded(fresh):
    lib = native.library("window_decode")
    assert lib is not None and hasattr(lib, "zoo_window_hybrid_decode_f32")
    built = list((fresh / "cache" / "native").glob("*/libwindow_decode.so"))
    assert len(built) == 1
    assert not list(built[0].parent.glob(".*"))  # no temporary file left behind
    assert native.library("window_decode") is lib  # loaded once per process
    assert native.unavailable_reason("window_decode") is None


def test_no_compiler_means_none_and_a_reason(fresh, monkeypatch):
    monkeypatch.setattr(native, "find_compiler", lambda: None)
    assert native.library("window_decode") is None
    assert "no C compiler" in native.unavailable_reason("window_decode")


@needs_compiler
def test_a_source_that_does_not_compile_means_none_and_the_complaint(fresh, monkeypatch):
    src = fresh / "src"
    src.mkdir()
    (src / "broken.c").write_text("int f( { return 0; }\n")
    monkeypatch.setattr(native, "SOURCES", src)
    assert native.library("broken") is None
    reason = native.unavailable_reason("broken")
    assert reason.startswith(f"{native.find_compiler()} could not build broken.c:") and len(reason) > 40
    assert not list((fresh / "cache" / "native").glob("*/*"))  # nothing half-built kept


def test_an_unknown_kernel_is_an_error(fresh):
    with pytest.raises(ValueError, match="no C kernel named 'nope'"):
        native.library("nope")


def test_disabled_nests_and_restores(fresh):
    with native.disabled():
        assert native.library("window_decode") is None
        with native.disabled():
            assert "disabled" in native.unavailable_reason("window_decode")
        assert native.library("window_decode") is None
    assert native._disabled == 0
    with pytest.raises(RuntimeError), native.disabled():
        raise RuntimeError("inside")
    assert native._disabled == 0


def test_zoo_native_off_in_the_environment(fresh, monkeypatch):
    monkeypatch.setenv(native.ENV_VAR, "off")
    assert native.library("window_decode") is None
    assert native.status() == {name: "off (ZOO_NATIVE=off)" for name in KERNELS}
    monkeypatch.setenv(native.ENV_VAR, "on")
    assert native.library("window_decode") is None  # read when a kernel is first asked for
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv(native.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="ZOO_NATIVE='fast' is not a setting; choose on or off"):
        native.library("window_decode")


@needs_compiler
def test_status_names_every_kernel_in_use(fresh):
    assert native.status() == {name: "in use" for name in KERNELS}


@needs_compiler
def test_function_sets_its_types_once_and_is_none_where_the_library_is(fresh):
    argtypes = [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 3
    fn = native.function("hedgehog_features", "zoo_hedgehog_features_f32", argtypes, restype=None)
    assert fn is not None and fn.argtypes == argtypes and fn.restype is None
    again = native.function("hedgehog_features", "zoo_hedgehog_features_f32", [ctypes.c_int], ctypes.c_int)
    assert again.argtypes == argtypes  # set once: a second caller does not change them
    with native.disabled():
        assert native.function("hedgehog_features", "zoo_hedgehog_features_f32", argtypes) is None
