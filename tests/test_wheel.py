"""The package as a user installs it: a wheel built from this checkout (`pip wheel . --no-deps`,
from a copy of the tree, so the checkout stays untouched) installed into a fresh venv, whose
console scripts run the demo end to end on CPU (`ckpt-engine-demo`: the reference server
`python -m workers.server` and the updater `torchrun -m ckpt_engine.update`) and answer
`ckpt-engine-update --help`, `ckpt-engine-server --help`.

The fresh venv gets the wheel only (`--no-deps --no-index`); the heavy dependencies (torch, ...)
come from this test's own environment through a `.pth` line added after the install (a venv made
with `--system-site-packages` from a venv would see the base interpreter's packages, not these),
and the test checks that each of the wheel's declared requirements is found there and that
`ckpt_engine` / `workers` are imported from the venv's copy, not from this checkout."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SKIP = (".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".whl", "out")


def run(cmd: list[str], *, cwd: Path, timeout: float, env: dict | None = None):
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd[0]} did not finish in {timeout} s:\n{out}")
    return proc.returncode, out


def test_wheel_installs_and_runs_the_demo(tmp_path):
    src, dist, venv = tmp_path / "src", tmp_path / "dist", tmp_path / "venv"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*SKIP))
    rc, out = run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
         "-w", str(dist), "-q"],
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert rc == 0, out
    (wheel,) = dist.glob("ckpt_engine-*.whl")
    rc, out = run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path, timeout=120)  # fmt: skip
    assert rc == 0, out
    py = venv / "bin" / "python"
    purelib = Path(run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path, timeout=60)[1].strip())  # fmt: skip
    rc, out = run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
         str(wheel), "-q"],
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert rc == 0, out
    assert (venv / "bin" / "ckpt-engine-update").exists()
    # torch and the other dependencies: this environment's, after the wheel's own copy
    (purelib / "zz-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    check = (
        "import importlib.metadata as m, re, ckpt_engine, workers, ckpt_engine.update\n"
        "reqs = [r for r in m.requires('ckpt-engine') if 'extra ==' not in r]\n"
        "names = [re.split(r'[<>=!~ ;\\[]', r)[0] for r in reqs]\n"
        "print({n: m.version(n) for n in names})\n"
        "print(ckpt_engine.__file__, workers.__file__)\n"
    )
    rc, out = run([str(py), "-c", check], cwd=tmp_path, timeout=120)
    assert rc == 0, out
    assert "prometheus-client" in out and "torch" in out
    assert out.count(str(purelib)) == 2, out  # both packages from the venv, not the checkout

    for script in ("ckpt-engine-update", "ckpt-engine-server"):
        rc, out = run([str(venv / "bin" / script), "--help"], cwd=tmp_path, timeout=120)
        assert rc == 0 and "--help" in out, out

    rc, out = run(
        [str(venv / "bin" / "ckpt-engine-demo"), "--device", "cpu", "--timeout", "120"],
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert rc == 0, out
    assert "GB/s" in out, out
