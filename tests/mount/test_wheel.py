"""Tier (c): fusemux installed the way an operator installs it: a wheel built with
``python -m build`` from a copy of the source, ``pip install``ed into a fresh venv. Its
``fusemux`` command runs without the source tree (from ``/``): ``--help``, ``check``, a short
``serve`` (per engine) and ``demo``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mount.harness import Daemon, mounted_at, run, wait_for

REPO = Path(__file__).resolve().parents[2]
VOL = b"wheel-test\n" * 100


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the built wheel installed; returns its bin directory."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    # A copy of what the build reads (building in the worktree would leave build/ and
    # egg-info there); no git: a bare machine may have none.
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(
        REPO / "fusemux", src / "fusemux", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    run(sys.executable, "-m", "build", "--wheel", "--outdir", base / "dist", src)
    wheels = sorted((base / "dist").glob("fusemux-*-py3-none-any.whl"))
    assert len(wheels) == 1, wheels
    run(sys.executable, "-m", "venv", base / "venv")
    run(base / "venv/bin/python", "-m", "pip", "install", "-q", wheels[0])
    shutil.rmtree(src)  # nothing of the source is left to lean on
    return base / "venv" / "bin"


def test_installed_command_without_source_tree(venv: Path, tmp_path: Path) -> None:
    where = run(
        venv / "python", "-c", "import fusemux, prometheus_client; print(fusemux.__file__)",
        cwd="/",
    ).stdout.strip()  # fmt: skip
    assert where.startswith(str(venv.parent / "lib")), where
    assert "usage: fusemux" in run(venv / "fusemux", "--help", cwd="/").stdout
    assert run(venv / "fusemux", "--version", cwd="/").stdout.startswith("fusemux ")
    config = tmp_path / "c.toml"
    config.write_text(
        'linger = 1\nmetrics_listen = "127.0.0.1:9477"\n[exports.a]\nsource = "s:/a"\n'
    )
    out = run(venv / "fusemux", "check", "--config", config, cwd="/").stdout
    assert out.startswith(f"{config}: OK, 1 export(s)")
    config.write_text("linger = -1\n")
    bad = run(venv / "fusemux", "check", "--config", config, cwd="/", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith(f"{config}:1: linger")


def test_installed_command_serves(venv: Path, daemon: Daemon) -> None:
    daemon.command = [str(venv / "fusemux")]
    daemon.cwd = Path("/")
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.write_config(linger=0)
    daemon.start()
    assert daemon.proc is not None
    exe = os.readlink(f"/proc/{daemon.proc.pid}/exe")
    cmdline = Path(f"/proc/{daemon.proc.pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[1].decode() == str(venv / "fusemux"), (exe, cmdline)
    assert daemon.volume("gold", "a").read_bytes() == VOL
    assert daemon.xattr(daemon.mnt, "engine") == daemon.engine
    assert daemon.stop() == 0


def test_installed_demo(venv: Path, tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [venv / "fusemux", "demo", "--dir", demo],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd="/",
        )
    try:
        wait_for(lambda: "fuse.fusemux" in mounted_at(demo / "mnt") or proc.poll() is not None, 60)
        assert proc.poll() is None, log_path.read_text()
        assert sorted(os.listdir(demo / "mnt" / "volumes")) == ["gold", "silver"]
        with open(demo / "mnt/volumes/gold/vm1-data.qcow2", "rb") as f:
            assert f.read(4) == b"QFI\xfb"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()
        assert "Traceback" not in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        from fusemux.core.mounter import MNT_DETACH, read_mountinfo, umount2

        for m in sorted(read_mountinfo(), key=lambda m: -len(m.mountpoint)):
            if m.mountpoint.startswith(str(demo) + "/"):
                with contextlib.suppress(OSError):
                    umount2(m.mountpoint, MNT_DETACH)


def test_unit_file_verifies(venv: Path, tmp_path: Path) -> None:
    """contrib/fusemux.service passes ``systemd-analyze verify`` (its ExecStart pointed at
    the installed command, since /usr/local/bin/fusemux does not exist on a test host)."""
    text = (REPO / "contrib/fusemux.service").read_text()
    assert "ExecStart=/usr/local/bin/fusemux serve " in text
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=", "TimeoutStopSec="):
        assert f"\n{line}" in text, line
    assert "ExecStartPost" not in text
    unit = tmp_path / "fusemux.service"
    unit.write_text(text.replace("/usr/local/bin/fusemux", str(venv / "fusemux")))
    result = run("systemd-analyze", "verify", unit, check=False)
    assert result.returncode == 0 and result.stderr == "", result
