"""NFS tier fixtures: one guest and two nfs-ganesha servers for the whole session.

Run by ``make test-nfs``, which installs the host packages (scripts/setup-nfs.sh), builds or
reuses the cached guest image (tests/nfs/image.py, outside the sandbox because it downloads)
and then runs pytest inside scripts/nfs-sandbox.sh. Outside that sandbox the tier is skipped:
it needs a private network namespace for rpcbind and the servers' standard ports.

Every scenario's observations are also written to ``.cache/nfs-tier/last-run.json``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.nfs import image
from tests.nfs.harness import NfsTier

if os.geteuid() != 0 or os.environ.get("FUSEMUX_NFS_SANDBOX") != "1":
    pytest.skip("the NFS tier runs only by `make test-nfs` (root, a private netns)",
                allow_module_level=True)  # fmt: skip

RESULTS: dict[str, Any] = {}


@pytest.fixture(scope="session")
def nfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NfsTier]:
    img = image.locate()
    if img is None:
        pytest.fail("the guest image is not built (it needs the network): run `make test-nfs`")
    tier = NfsTier(tmp_path_factory.mktemp("nfs"), img)
    t0 = time.monotonic()
    try:
        tier.start()
        RESULTS["boot_s"] = round(time.monotonic() - t0, 1)
        yield tier
    finally:
        bye = tier.close()
        RESULTS["bye"] = bye
        out = image.DEFAULT_CACHE / "last-run.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(RESULTS, indent=1, default=str) + "\n")
    assert bye is not None and bye.get("event") == "bye", f"no clean guest shutdown: {bye}"
    assert bye["daemon_rc"] == 0, bye
    assert bye["left_mounts"] == [], bye


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A dict the test fills with what the guest observed; saved under the test's name."""
    data: dict[str, Any] = {}
    yield data
    RESULTS[request.node.name] = data
    print(json.dumps(data, default=str)[:3000])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/nfs/" in str(item.fspath):
            item.add_marker(pytest.mark.nfs)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "nfs: the NFS guest tier (make test-nfs)")
