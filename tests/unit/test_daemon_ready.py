"""Tier (a): the daemon's readiness announcement when the mount goes away before it answers
(a SIGTERM right after the start): no READY=1, no on_ready, no failure, no exception."""

from __future__ import annotations

from pathlib import Path

from fusemux import daemon


async def test_a_mount_gone_before_it_answered_is_not_an_error(tmp_path: Path) -> None:
    ready: list[bool] = []
    stopped: list[bool] = []
    options = daemon.Options(on_ready=lambda: ready.append(True))
    gone = tmp_path / "mnt"  # no volumes/ in it: the stat fails with ENOENT
    await daemon._announce_ready(None, str(gone), options, lambda: stopped.append(True))  # type: ignore[arg-type]
    assert ready == [] and stopped == [] and options.failure == ""
