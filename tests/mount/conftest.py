"""Tier (c) fixtures: a daemon per test, stopped, checked and cleaned up afterwards.

The whole tier needs root (it mounts); it is skipped otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mount.harness import Daemon, checked_daemon

if os.geteuid() != 0:
    pytest.skip("tier (c) tests need root (mounts)", allow_module_level=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/mount/" in str(item.fspath):
            item.add_marker(pytest.mark.mount)


# Every tier-(c) test runs once per FUSE engine, and once more on the own engine with
# kernel_passthrough = "off" ("fallback": every read and write served by fusemux, as on a
# kernel without FUSE passthrough).
ENGINES = ("pyfuse3", "passthrough", "fallback")


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def daemon(tmp_path: Path, engine: str) -> Iterator[Daemon]:
    """A daemon to configure and start; stopped, checked and cleaned up afterwards."""
    with checked_daemon(tmp_path, engine) as d:
        yield d
