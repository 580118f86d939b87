"""The built wheel works on its own: installed into a fresh virtual environment, `zoo list` runs and a tiny
`zoo run` of a recipe shipped inside the package finishes (the recipes are package data), and the C
kernels' sources ship with it and build from the installed package."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

from zoo_testing import tiny_overrides

from zoo.kernels import native

ROOT = Path(__file__).resolve().parents[1]


def run(args, cwd, **kwargs):
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, args[:4]))}: {result.stderr[-2000:]}"
    return result.stdout


def test_the_wheel_installs_into_a_fresh_venv_and_runs(tiny_world, tmp_path):
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("zoo_linearize-*.whl")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    # this environment's pip installs into the fresh venv (pip --python), which needs no pip of its own
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        cwd=tmp_path,
    )
    # zoo comes from the wheel; its dependencies (torch, transformers, ...) from this environment's
    # site-packages, appended after the venv's own (a .pth line adds a path, not the editable install in it)
    purelib = Path(
        run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path
        ).strip()
    )
    (purelib / "zoo-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    zoo = str(venv / "bin" / "zoo")
    listed = run([zoo, "list"], cwd=tmp_path)
    assert "lolcats" in listed and "gated-delta-conv" in listed
    where = run(
        [str(python), "-c", "import zoo, zoo.cli; print(zoo.__file__); print(zoo.cli.RECIPES_ROOT)"],
        cwd=tmp_path,
    ).split()
    assert all(Path(p).is_relative_to(venv) for p in where), (
        where
    )  # the package and its recipes, from the wheel
    if native.find_compiler() is not None:
        probe = (
            "from zoo.kernels import native as n; print(n.library('window_decode') is not None, n.SOURCES)"
        )
        built, sources = run(
            [str(python), "-c", probe],
            cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin", "ZOO_CACHE": str(tmp_path)},
        ).split()
        assert built == "True" and Path(sources).is_relative_to(venv)
    recipe = Path(where[1]) / "smollm2-135m" / "hedgehog.yaml"
    overrides = tiny_overrides(tiny_world, **{"stage2.enabled": False, "eval.generation_prompts": 0})
    run(
        [zoo, "run", str(recipe), *overrides, "--out", str(tmp_path / "run")],
        cwd=tmp_path,
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "ZOO_CACHE": str(tmp_path / "cache"),
            "OMP_NUM_THREADS": "1",
        },
    )
    assert (tmp_path / "run" / "summary.json").is_file() and (
        tmp_path / "run" / "model" / "config.json"
    ).is_file()
