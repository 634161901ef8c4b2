"""The NFS scenarios: fusemux in a guest with the real kernel NFS client, against ganesha.

The tests run in file order against one guest (see conftest.py). Each asks the guest agent
(tests/nfs/agent.py) to run one scenario and asserts on what the guest observed; the guest
asks the host to stop, kill, restart or change the servers at the right moments.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from tests.nfs.harness import (
    CINDER_EXPORT,
    ENGINE,
    EXPORTS,
    IO_TIMEOUTS,
    MOUNT_TIMEOUT,
    VOLUME_SIZE,
    NfsTier,
)
from tests.nfs.image import RELEASE

OUTAGE = 5.0  # long enough for `fusemux status` (2-3 s under TCG) to finish inside it


def test_boot(nfs: NfsTier, record: dict[str, Any]) -> None:
    data = nfs.run("boot")
    record.update(data)
    assert set(EXPORTS) | {CINDER_EXPORT} == set(data["exports"])
    assert set(data["states"].values()) == {"unmounted"}
    assert data["engine"] == ENGINE
    if ENGINE == "passthrough":
        # Debian 12's 6.1 kernel (FUSE 7.38) offers no passthrough: the engine serves all
        # reads and writes itself, and says so. Debian 13's 6.12 has it (Linux >= 6.9).
        release = tuple(int(x) for x in data["kernel"].split("-")[0].split(".")[:2])
        want = release >= (6, 9)
        assert data["engine_stats"]["passthrough"] is want, (data["kernel"], data["engine_stats"])


@pytest.mark.parametrize("export", ["v4hard", "v3hard", CINDER_EXPORT])
def test_roundtrip(nfs: NfsTier, record: dict[str, Any], export: str) -> None:
    """Lazy mount on first open, data both ways, unmount after the last close (linger 0)."""
    path = nfs.server_path(export) if export in EXPORTS else nfs.servers["a"].root / "cinder/vol"
    want = hashlib.md5(path.read_bytes()).hexdigest()
    data = nfs.run("roundtrip", export=export, size=VOLUME_SIZE, seed=11, server_path=str(path))
    record.update(data)
    assert data["before"] == "unmounted" and not data["mounted_before"]
    assert data["state_open"] == "mounted" and data["mounted_open"]
    assert data["guest_md5_initial"] == want
    assert data["server_md5_written"] == data["written_md5"]
    assert data["guest_md5_server_write"] == data["server_write_md5"]
    assert not data["mounted_after_close"]
    assert data["mount_count_delta"] == 1
    assert data["mount_count_total"] == 2


def test_qemu_io(nfs: NfsTier, record: dict[str, Any]) -> None:
    data = nfs.run("qemu_io", export="v4hard", server_path=str(nfs.server_path("v4hard")))
    record.update(data)
    assert data["rc"] == 0 and data["reread_rc"] == 0, data
    assert data["pattern_failures"] == 0, data
    assert data["server_md5"] == data["want_md5"]


@pytest.mark.parametrize("export", ["v4hard", "v3hard"])
def test_locks_reach_the_nfs_server(nfs: NfsTier, record: dict[str, Any], export: str) -> None:
    """A VM-style OFD lock through fusemux is a lock on the NFS file: a plain NFS mount of
    the export (its own superblock) is refused, and so is the server's own file. On v4 only:
    the tier's v3 exports use ``nolock`` and its ganesha runs without NLM, so there the lock
    stays on the guest, as docs/nfs.md says (checked as such)."""
    _, sdir, fstype, options = EXPORTS[export]
    addr = dict(o.partition("=")[::2] for o in options.split(","))["addr"]
    data = nfs.run(
        "locks", export=export, fstype=fstype, options=options, source=f"{addr}:/{sdir}",
        server_path=str(nfs.server_path(export)),
    )  # fmt: skip
    record.update(data)
    assert data["plain_before"] is None, data
    if ENGINE == "pyfuse3" or export.startswith("v3"):
        # Documented: pyfuse3 keeps locks inside the FUSE mount (reliability.md); v3 with
        # nolock keeps them on the client host (nfs.md).
        assert data["plain_ofd"] is None and data["server_ofd"] is None, data
        return
    assert data["locks_xattr"].split()[1:] == ["write", "0-max"], data
    assert data["server_ofd"] in ("EAGAIN", "EACCES"), data  # ganesha holds it on its file
    assert data["plain_ofd"] in ("EAGAIN", "EACCES"), data
    assert data["plain_ofd_read"] in ("EAGAIN", "EACCES"), data
    assert data["plain_posix"] in ("EAGAIN", "EACCES"), data
    assert data["plain_after"] is None, data  # the close released it on the server
    assert data["server_after"] is None, data


def test_unreachable(nfs: NfsTier, record: dict[str, Any]) -> None:
    data = nfs.run("unreachable", export="dead", other="other")
    record.update(data)
    assert data["open_errno"] is not None
    assert data["open_s"] < MOUNT_TIMEOUT + 3
    assert data["state_after"] == "failed"
    assert data["last_error"].startswith("mount failed")
    assert max(data["other_read_s"]) < 2.0


@pytest.mark.parametrize("export", ["v3hard", "v3soft", "v4hard", "v4soft", "v4timeo"])
def test_outage(nfs: NfsTier, record: dict[str, Any], export: str) -> None:
    """SIGSTOP the server while a volume is read; others, xattrs and status keep answering."""
    data = nfs.run(
        "outage",
        export=export,
        other="other",
        size=VOLUME_SIZE,
        outage=OUTAGE,
        server_path=str(nfs.server_path(export)),
    )
    record.update(data)
    assert not data["reader_stuck"]
    assert max(data["other_read_s"]) < 1.5, data["other_read_s"]
    assert data["xattr_state_s"] < 1.0 and data["xattr_state"] == "mounted"
    # status answers while the server is stopped; the sick export is named as not answering.
    assert data["status_answered_during_outage"], data.get("status_s")
    assert data["status_export"]["state"] == "mounted"
    assert data["status_export"].get("backing_answers") is False
    assert "first_ok_after_cont_s" in data
    # Export health: unresponsive while the server is stopped (a statvfs probe overdue by
    # 3 s, or failed), ok again by itself after the resume.
    assert [v for _, v in data["health"]][:1] == ["ok"], data["health"]
    assert "unresponsive" in [v for _, v in data["health"]], data["health"]
    assert data["health_ok_after_cont_s"] is not None, data["health"]
    assert data["md5_reopen"]
    if export in IO_TIMEOUTS:
        # fusemux's io_timeout turns the stuck read into ETIMEDOUT after that time.
        assert "ETIMEDOUT" in data["read_errnos"], data["read_errnos"]
        assert IO_TIMEOUTS[export] - 0.5 <= data["first_err_after_stop_s"] < OUTAGE


@pytest.mark.parametrize("export", ["v4hard", "v3hard"])
def test_restart(nfs: NfsTier, record: dict[str, Any], export: str) -> None:
    data = nfs.run(
        "restart", export=export, size=VOLUME_SIZE, seed=21, down=2.0,
        server_path=str(nfs.server_path(export)),
    )  # fmt: skip
    record.update(data)
    assert not data["io_stuck"]
    assert data["reopen_ok"] and data["server_ok"]


def test_removed(nfs: NfsTier, record: dict[str, Any]) -> None:
    d = nfs.servers["a"].root / "gone"
    data = nfs.run("removed", export="gone", server_dir=str(d), seed=31, size=1 << 20)
    record.update(data)
    assert not data["io_stuck"]  # the open fd may keep working (ganesha holds the file)
    # A new open fails fast on the bookworm guest (6.1, v4.2). The trixie guest's 6.12 client
    # (v4.1) opened the removed file without asking a question the server could refuse: the
    # file is still open, so ganesha still has it. Either way, no hang.
    allowed = ("ESTALE", "EIO") if RELEASE == "bookworm" else ("ESTALE", "EIO", None)
    assert data["open_while_gone_errno"] in allowed, data
    assert data["open_while_gone_s"] < 5
    assert data.get("recovered_md5_ok"), data


def test_daemon_log(nfs: NfsTier, record: dict[str, Any]) -> None:
    data = nfs.run("daemon")
    record.update(data)
    assert data["alive"]
    assert data["tracebacks"] == 0, data
