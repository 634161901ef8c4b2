"""libvirt tier fixtures: tier (c)'s fusemux daemon plus private libvirt hosts.

The ``daemon`` fixture is tier (c)'s own (``tests/mount/conftest.py``): the real daemon as a
subprocess, stopped and checked (exit 0, no mounts left, no unexpected log lines) after each
test; ``engine`` picks the engines for this tier (``LIBVIRT_ENGINES``). ``libvirt_host``
starts a private libvirt host (``harness.Libvirt``) after the test has started its fusemux
mounts; each one is stopped and checked in teardown. ``daemon2`` is a second fusemux daemon
("another host"), checked like the first.

Run by ``make test-libvirt`` (root, Debian's libvirt from ``scripts/setup-libvirt.sh``);
skipped without root or without libvirtd.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PUBLIC_DIR
from tests.libvirt.harness import Libvirt
from tests.mount.conftest import daemon  # noqa: F401  (tier (c)'s fixture)
from tests.mount.harness import Daemon, checked_daemon

if os.geteuid() != 0:
    pytest.skip("the libvirt tier needs root", allow_module_level=True)
if shutil.which("libvirtd") is None and not Path("/usr/sbin/libvirtd").exists():
    pytest.skip("libvirtd is not installed: run scripts/setup-libvirt.sh", allow_module_level=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/libvirt/" in str(item.fspath):
            item.add_marker(pytest.mark.libvirt)


# The engines a libvirt test runs on (tier (c)'s ``engine`` modes): pyfuse3, which ``auto``
# picks on kernels without FUSE passthrough (Debian 12's 6.1), and the own engine with kernel
# passthrough. Tier (c) also runs the own engine without passthrough ("fallback"); here that
# would add minutes for a path libvirt does not reach differently.
LIBVIRT_ENGINES = ("pyfuse3", "passthrough")


@pytest.fixture(params=LIBVIRT_ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def public_mountpoint(d: Daemon) -> None:
    """Serve *d* where qemu (uid libvirt-qemu) can reach it: pytest's tmp dirs are 0700."""
    PUBLIC_DIR.mkdir(mode=0o755, exist_ok=True)
    PUBLIC_DIR.chmod(0o755)
    d.mnt = Path(tempfile.mkdtemp(dir=PUBLIC_DIR))
    d.mnt.chmod(0o755)


@pytest.fixture(scope="session")
def libvirt_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """/var/cache/libvirt for every host of the session (qemu's probed capabilities)."""
    return tmp_path_factory.mktemp("libvirt-cache") / "cache"


@pytest.fixture
def libvirt_host(tmp_path: Path, libvirt_cache: Path) -> Iterator[Callable[..., Libvirt]]:
    """Start a private libvirt host: ``libvirt_host(qemu_conf="", **kw)`` (``Libvirt``'s
    keywords). Start the fusemux mounts it uses first."""
    hosts: list[Libvirt] = []

    def start(qemu_conf: str = "", **kw: Any) -> Libvirt:
        host = Libvirt(tmp_path / f"libvirt{len(hosts)}", libvirt_cache, qemu_conf, **kw)
        hosts.append(host)
        host.start()
        return host

    try:
        yield start
        for host in reversed(hosts):  # a host may share the network namespace of an earlier one
            host.stop()
    finally:
        for host in reversed(hosts):
            host.cleanup()


@pytest.fixture
def daemon2(tmp_path: Path, engine: str) -> Iterator[Daemon]:
    """A second fusemux daemon ("another host"), checked like tier (c)'s ``daemon``."""
    with checked_daemon(tmp_path / "host2", engine, "second daemon") as d:
        yield d
