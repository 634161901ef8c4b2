"""Tier (a): the export mount manager (:mod:`fusemux.core.exports`) over a FakeMounter.

Covers lazy mounting, the holder count, linger timing (on pytest-trio's autojump clock),
cancelling a linger by a new holder, one mount for many concurrent acquires, failed and
timed-out mounts (state, last_error, errno, retry, waiters sharing one failure), busy
unmounts and their retries, ``hold()``, adopting an existing mount, cancellation mid-mount,
shutdown, and a randomized interleaving of many holders over three exports. Throughout, the
fake checks that no target is mounted twice and that no unmount happens while the export
has holders.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio
import trio.testing

from fusemux.config import Config
from fusemux.core.exports import (
    MOUNT_BACKOFF_MAX,
    MOUNT_BACKOFF_MIN,
    TRANSIENT_GRACE,
    UNMOUNT_RETRY_MAX,
    UNMOUNT_RETRY_MIN,
    Export,
    ExportManager,
    ExportSnapshot,
    State,
)
from fusemux.errors import MountError, MountTimeout, NotFound, ShuttingDown, errno_of
from tests.fakes import FakeMounter, make_config, make_manager, until

LINGER = 10.0
T = TypeVar("T")


def state_of(export: Export) -> State:
    """The state now (a function, so that mypy does not keep an earlier narrowing)."""
    return export.state


@pytest.fixture(autouse=True)
def inline_worker_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the manager's one blocking call (makedirs of the target) inline.

    On the autojump clock, time jumps whenever every task waits, including while a task
    waits for a worker thread; inline calls keep trio time and thread timing apart, and make
    each randomized run below reproducible from its seed.
    """

    async def run_sync(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)


def setup(
    tmp_path: Path,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    names: tuple[str, ...] = ("alpha",),
    linger: float = LINGER,
    mount_timeout: float = 60.0,
) -> tuple[ExportManager, FakeMounter, Config]:
    config = make_config(tmp_path / "state", names, linger=linger, mount_timeout=mount_timeout)
    manager, fake = make_manager(config, nursery, monkeypatch)
    return manager, fake, config


# -- mounting on demand ------------------------------------------------------------------


async def test_mount_is_lazy(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, config = setup(tmp_path, nursery, monkeypatch)
    export = manager.get("alpha")
    target = config.mnt_dir / "alpha"
    assert export.target == target
    assert state_of(export) is State.UNMOUNTED and not export.mounted
    assert fake.mount_calls == [] and not target.exists()

    got = await manager.acquire("alpha")
    assert got is export
    assert [(c.export, c.source, c.target, c.timeout) for c in fake.mount_calls] == [
        ("alpha", "server:/alpha", target, config.mount_timeout)
    ]
    assert state_of(export) is State.MOUNTED and export.mounted
    assert (export.holders, export.mount_count, export.last_error) == (1, 1, "")
    assert target.is_dir() and target.stat().st_mode & 0o777 == 0o700
    assert fake.is_mounted(target)
    assert export.backing_path("vol") == target / "vol"


async def test_second_acquire_does_not_mount_again(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch)
    await manager.acquire("alpha")
    export = await manager.acquire("alpha")
    assert fake.mount_count() == 1
    assert export.holders == 2 and export.mount_count == 1
    manager.release(export)
    await trio.sleep(LINGER * 3)
    assert export.mounted and export.holders == 1 and fake.umount_calls == []


async def test_unknown_export(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch)
    with pytest.raises(NotFound) as info:
        await manager.acquire("nope")
    assert errno_of(info.value) == errno.ENOENT
    with pytest.raises(NotFound):
        manager.get("nope")
    assert fake.mount_calls == []


async def test_snapshot(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, _, config = setup(tmp_path, nursery, monkeypatch)
    export = await manager.acquire("alpha")
    assert export.snapshot() == ExportSnapshot(
        name="alpha",
        source="server:/alpha",
        fstype="nfs",
        state=State.MOUNTED,
        holders=1,
        mount_count=1,
        last_error="",
        target=config.mnt_dir / "alpha",
    )


# -- linger --------------------------------------------------------------------------------


async def test_unmount_after_linger(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, config = setup(tmp_path, nursery, monkeypatch)
    export = await manager.acquire("alpha")
    released_at = trio.current_time()
    manager.release(export)
    assert export.holders == 0 and export.mounted
    await trio.sleep(LINGER - 0.01)
    assert export.mounted and fake.umount_calls == []
    await trio.sleep(0.02)
    assert state_of(export) is State.UNMOUNTED
    assert fake.umount_calls == [config.mnt_dir / "alpha"]
    assert not fake.is_mounted(export.target)
    assert trio.current_time() - released_at == pytest.approx(LINGER + 0.01)
    # Nothing more happens later.
    await trio.sleep(LINGER * 10)
    assert fake.umount_count() == 1 and fake.mount_count() == 1


async def test_only_the_last_release_starts_the_linger(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch)
    export = await manager.acquire("alpha")
    await manager.acquire("alpha")
    manager.release(export)
    await trio.sleep(LINGER * 2)
    assert export.mounted and fake.umount_calls == []
    manager.release(export)
    await trio.sleep(LINGER + 0.01)
    assert state_of(export) is State.UNMOUNTED


async def test_linger_zero_unmounts_right_after_last_release(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch, linger=0)
    export = await manager.acquire("alpha")
    start = trio.current_time()
    manager.release(export)
    await trio.testing.wait_all_tasks_blocked()
    assert state_of(export) is State.UNMOUNTED
    assert fake.umount_count() == 1
    assert trio.current_time() == start


async def test_reacquire_during_linger_cancels_the_unmount(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch)
    export = await manager.acquire("alpha")
    manager.release(export)
    await trio.sleep(LINGER / 2)
    assert await manager.acquire("alpha") is export
    assert export.linger_scope is None
    await trio.sleep(LINGER * 3)
    assert export.mounted and export.mount_count == 1
    assert fake.mount_count() == 1 and fake.umount_calls == []
    manager.release(export)  # the linger starts over from the full time
    await trio.sleep(LINGER - 0.01)
    assert export.mounted
    await trio.sleep(0.02)
    assert state_of(export) is State.UNMOUNTED and fake.umount_count() == 1


async def test_acquire_while_unmounting_waits_and_mounts_again(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch)
    fake.umount_delay = 3.0
    export = await manager.acquire("alpha")
    manager.release(export)
    await trio.sleep(LINGER + 1)
    assert state_of(export) is State.UNMOUNTING
    await manager.acquire("alpha")
    assert fake.umount_count() == 1 and fake.mount_count() == 2
    assert export.mounted and export.mount_count == 2 and export.holders == 1
    assert trio.current_time() == pytest.approx(LINGER + 3)


# -- concurrency ----------------------------------------------------------------------------


async def test_concurrent_acquires_mount_once(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch)
    fake.mount_delay = 2.0
    got = []

    async def one() -> None:
        got.append(await manager.acquire("alpha"))

    async with trio.open_nursery() as tasks:
        for _ in range(20):
            tasks.start_soon(one)
        await until(lambda: fake.mount_count() == 1)
        await trio.testing.wait_all_tasks_blocked()
        export = manager.get("alpha")
        assert state_of(export) is State.MOUNTING and export.holders == 20
    assert len(got) == 20 and all(e is export for e in got)
    assert fake.mount_count() == 1
    assert export.holders == 20 and export.mount_count == 1
    for e in got:
        manager.release(e)
    await trio.sleep(LINGER + 0.01)
    assert state_of(export) is State.UNMOUNTED and fake.umount_count() == 1


async def test_exports_are_independent(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch, names=("alpha", "beta"))
    fake.fail("beta")
    alpha = await manager.acquire("alpha")
    with pytest.raises(MountError):
        await manager.acquire("beta")
    assert alpha.mounted and manager.get("beta").state is State.FAILED
    manager.release(alpha)
    await trio.sleep(LINGER + 1)
    assert state_of(alpha) is State.UNMOUNTED
    assert manager.get("beta").state is State.FAILED


# -- failures ----------------------------------------------------------------------------


async def test_failed_mount(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch)
    fake.fail("alpha", "mount.nfs: Connection refused")
    with pytest.raises(MountError) as info:
        await manager.acquire("alpha")
    assert info.value.errno == errno.ECONNREFUSED
    export = manager.get("alpha")
    assert state_of(export) is State.FAILED and not export.mounted
    assert export.last_error == "mount failed: mount.nfs: Connection refused"
    assert export.last_error.startswith("mount failed:")
    assert export.holders == 0 and export.mount_count == 0
    assert export.linger_scope is None
    await trio.sleep(LINGER * 2)
    assert fake.umount_calls == []

    # The next acquire retries (and fails again while the server is down).
    with pytest.raises(MountError):
        await manager.acquire("alpha")
    assert fake.mount_count() == 2

    # Within the backoff window the failure repeats at once, without a mount attempt.
    fake.stop_failing()
    with pytest.raises(MountError):
        await manager.acquire("alpha")
    assert fake.mount_count() == 2
    await trio.sleep(MOUNT_BACKOFF_MAX)
    assert await manager.acquire("alpha") is export
    assert fake.mount_count() == 3
    assert state_of(export) is State.MOUNTED and export.last_error == ""
    assert export.holders == 1 and export.mount_count == 1


async def test_waiters_share_a_failing_mount(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch)
    fake.mount_delay = 5.0
    fake.fail("alpha", "mount.nfs: access denied by server while mounting server:/alpha")
    errors: list[MountError] = []

    async def one() -> None:
        try:
            await manager.acquire("alpha")
        except MountError as e:
            errors.append(e)

    async with trio.open_nursery() as tasks:
        for _ in range(10):
            tasks.start_soon(one)
    assert len(errors) == 10
    assert fake.mount_count() == 1  # one attempt, not a storm
    assert {e.errno for e in errors} == {errno.EACCES}
    export = manager.get("alpha")
    assert export.holders == 0 and state_of(export) is State.FAILED
    assert trio.current_time() == pytest.approx(5.0)  # nobody waited for a second attempt

    # A new acquire after the failure (and its backoff) retries.
    fake.stop_failing()
    await trio.sleep(MOUNT_BACKOFF_MIN)
    await manager.acquire("alpha")
    assert fake.mount_count() == 2 and export.mounted


async def test_mount_timeout(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch, mount_timeout=7.0)
    fake.hang = True
    start = trio.current_time()
    with pytest.raises(MountTimeout) as info:
        await manager.acquire("alpha")
    assert trio.current_time() - start == pytest.approx(7.0)
    assert info.value.errno == errno.ETIMEDOUT == errno_of(info.value)
    export = manager.get("alpha")
    assert state_of(export) is State.FAILED and export.holders == 0
    assert export.last_error.startswith("mount failed:")
    assert "timed out after 7s" in export.last_error
    assert export.last_errno == errno.ETIMEDOUT


async def test_waiters_behind_a_timed_out_mount_get_etimedout(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch, mount_timeout=7.0)
    fake.hang = True
    errnos: list[int] = []

    async def one() -> None:
        with pytest.raises(MountError) as info:
            await manager.acquire("alpha")
        errnos.append(info.value.errno)

    async with trio.open_nursery() as tasks:
        for _ in range(3):
            tasks.start_soon(one)
    assert errnos == [errno.ETIMEDOUT] * 3
    assert fake.mount_count() == 1


async def test_target_that_cannot_be_created(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, config = setup(tmp_path, nursery, monkeypatch)
    config.state_dir.mkdir()
    config.mnt_dir.write_text("a file where the mnt directory should be")
    with pytest.raises(MountError) as info:
        await manager.acquire("alpha")
    assert info.value.errno == errno.ENOTDIR
    export = manager.get("alpha")
    assert state_of(export) is State.FAILED and export.holders == 0
    assert export.last_error.startswith(f"mount failed: cannot prepare {export.target}: ")
    assert fake.mount_calls == []


async def test_existing_mount_is_adopted(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, config = setup(tmp_path, nursery, monkeypatch)
    fake.mounted.add(config.mnt_dir / "alpha")  # left over by a daemon that died
    export = await manager.acquire("alpha")
    assert fake.mount_calls == []
    assert export.mounted and export.mount_count == 1
    manager.release(export)
    await trio.sleep(LINGER + 1)
    assert state_of(export) is State.UNMOUNTED and fake.mounted == set()


async def test_cancelled_mount_leaves_no_holder(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch)
    fake.mount_delay = 10.0
    scope = trio.CancelScope()

    async def acquire() -> None:
        with scope:
            await manager.acquire("alpha")

    async with trio.open_nursery() as tasks:
        tasks.start_soon(acquire)
        await until(lambda: fake.mount_count() == 1)
        await trio.sleep(3)
        scope.cancel()
    # The last waiter gave up: the mount attempt (a task of its own) is cancelled now.
    await trio.testing.wait_all_tasks_blocked()
    assert trio.current_time() == pytest.approx(3)
    export = manager.get("alpha")
    assert export.holders == 0 and state_of(export) is State.UNMOUNTED
    assert not export.lock.locked()
    fake.mount_delay = 0
    await manager.acquire("alpha")
    assert export.mounted and fake.mount_count() == 2


async def test_a_cancelled_waiter_does_not_abort_the_mount_for_another(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    """Issue 11: the first caller (the one that started the mount) is cancelled while a
    second waits for the same mount: the mount goes on, once, and the second gets it."""
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch)
    fake.mount_delay = 5.0
    first = trio.CancelScope()
    got: list[Export] = []

    async def interrupted() -> None:
        with first:
            await manager.acquire("alpha")

    async def waiting() -> None:
        got.append(await manager.acquire("alpha"))

    async with trio.open_nursery() as tasks:
        tasks.start_soon(interrupted)
        await until(lambda: fake.mount_count() == 1)
        tasks.start_soon(waiting)
        await trio.sleep(1)
        first.cancel()
    export = manager.get("alpha")
    assert got == [export] and export.mounted
    assert fake.mount_count() == 1 and export.mount_count == 1
    assert export.holders == 1 and export.last_error == ""
    assert trio.current_time() == pytest.approx(5)


async def test_cancelled_waiter_on_a_mounted_export_starts_the_linger(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    """A waiter that gives up during a mount drops only its own holder."""
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch)
    fake.mount_delay = 2.0
    async with trio.open_nursery() as tasks:
        tasks.start_soon(manager.acquire, "alpha")
        await until(lambda: fake.mount_count() == 1)
        with trio.move_on_after(1):
            await manager.acquire("alpha")
    export = manager.get("alpha")
    assert export.holders == 1 and export.mounted
    manager.release(export)
    await trio.sleep(LINGER + 1)
    assert state_of(export) is State.UNMOUNTED


# -- busy unmounts ----------------------------------------------------------------------


async def test_busy_unmount_is_retried(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch)
    export = await manager.acquire("alpha")
    fake.busy = True
    manager.release(export)
    await trio.sleep(LINGER + 0.01)
    assert fake.umount_count() == 1
    assert state_of(export) is State.MOUNTED
    assert export.last_error.startswith("unmount failed:")
    assert "target is busy" in export.last_error
    # Retries back off: 1 s, then 2 s, then 4 s...
    await trio.sleep(UNMOUNT_RETRY_MIN)
    assert fake.umount_count() == 2
    await trio.sleep(2 * UNMOUNT_RETRY_MIN)
    assert fake.umount_count() == 3
    fake.busy = False
    await trio.sleep(4 * UNMOUNT_RETRY_MIN)
    assert fake.umount_count() == 4
    assert state_of(export) is State.UNMOUNTED and export.last_error == ""
    assert export.unmount_retry == UNMOUNT_RETRY_MIN
    await trio.sleep(100)
    assert fake.umount_count() == 4


async def test_busy_unmount_backoff_is_capped(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch, linger=0)
    export = await manager.acquire("alpha")
    fake.busy = True
    manager.release(export)
    await trio.sleep(3600)
    # 1+2+4+8+16+32 = 63 s, then every 60 s: 1 + 6 + (3600-63)//60 attempts.
    assert fake.umount_count() == 1 + 6 + (3600 - 63) // 60
    assert export.unmount_retry == UNMOUNT_RETRY_MAX


async def test_new_holder_while_unmount_retry_is_pending(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch)
    export = await manager.acquire("alpha")
    fake.busy = True
    manager.release(export)
    await trio.sleep(LINGER + 0.1)
    assert fake.umount_count() == 1
    await manager.acquire("alpha")  # fast path: still mounted
    fake.busy = False
    await trio.sleep(LINGER * 5)
    assert fake.umount_count() == 1 and export.mounted and fake.mount_count() == 1
    manager.release(export)
    await trio.sleep(LINGER + 0.1)
    assert state_of(export) is State.UNMOUNTED and fake.umount_count() == 2


# -- hold() -------------------------------------------------------------------------------


async def test_hold(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch)
    async with manager.hold("alpha") as export:
        assert export.mounted and export.holders == 1
    assert export.holders == 0 and export.mounted
    with pytest.raises(RuntimeError, match="boom"):
        async with manager.hold("alpha") as again:
            assert again.holders == 1
            raise RuntimeError("boom")
    assert export.holders == 0
    await trio.sleep(LINGER + 0.1)
    assert state_of(export) is State.UNMOUNTED
    assert fake.mount_count() == 1 and fake.umount_count() == 1


async def test_hold_on_failing_export_holds_nothing(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch)
    fake.fail()
    with pytest.raises(MountError):
        async with manager.hold("alpha"):
            raise AssertionError("not reached")
    assert manager.get("alpha").holders == 0


async def test_release_without_holder_is_ignored(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch)
    export = await manager.acquire("alpha")
    manager.release(export)
    manager.release(export)
    assert export.holders == 0
    await trio.sleep(LINGER + 1)
    assert state_of(export) is State.UNMOUNTED and fake.umount_count() == 1


# -- transient holds ------------------------------------------------------------------------


async def test_transient_release_waits_at_least_the_grace_time(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    """With linger 0, the kernel's LOOKUP before an OPEN must not mount twice."""
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch, linger=0)
    assert TRANSIENT_GRACE > 0
    async with manager.hold("alpha") as export:
        pass
    await trio.sleep(TRANSIENT_GRACE - 0.01)
    assert export.mounted and fake.umount_calls == []
    opened = await manager.acquire("alpha")  # the OPEN after the LOOKUP joins the mount
    assert fake.mount_count() == 1
    manager.release(opened)  # an open file: linger 0 applies
    await trio.testing.wait_all_tasks_blocked()
    assert state_of(export) is State.UNMOUNTED and fake.umount_count() == 1


async def test_transient_release_alone_unmounts_after_the_grace_time(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch, linger=0)
    export = await manager.acquire("alpha")
    manager.release(export, transient=True)
    await trio.sleep(TRANSIENT_GRACE - 0.01)
    assert export.mounted
    await trio.sleep(0.02)
    assert state_of(export) is State.UNMOUNTED


async def test_transient_release_with_a_longer_linger_uses_the_linger(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch, linger=5.0)
    async with manager.hold("alpha") as export:
        pass
    await trio.sleep(5.0 - 0.01)
    assert export.mounted
    await trio.sleep(0.02)
    assert state_of(export) is State.UNMOUNTED


async def test_hold_if_mounted_never_mounts(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch)
    async with manager.hold_if_mounted("alpha") as got:
        assert got is None
    export = manager.get("alpha")
    assert fake.mount_calls == [] and export.holders == 0
    fake.fail()
    with pytest.raises(MountError):
        await manager.acquire("alpha")
    async with manager.hold_if_mounted("alpha") as got:
        assert got is None  # failed is not mounted
    with pytest.raises(NotFound):
        async with manager.hold_if_mounted("nope"):
            pass


async def test_hold_if_mounted_does_not_restart_the_linger(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch, linger=2.0)
    export = await manager.acquire("alpha")
    manager.release(export)
    released = trio.current_time()
    await trio.sleep(1.5)
    async with manager.hold_if_mounted("alpha") as got:  # a quick statvfs (df, status)
        assert got is export and export.holders == 1
        assert export.linger_scope is not None  # the pending unmount is left running
        await trio.sleep(0.1)
    assert export.holders == 0
    await trio.sleep(released + 2.0 - 0.01 - trio.current_time())
    assert export.mounted
    await trio.sleep(0.02)
    # Unmounted on the original schedule: polling never keeps an idle export mounted.
    assert state_of(export) is State.UNMOUNTED and fake.mount_count() == 1


async def test_hold_if_mounted_blocks_an_unmount_while_it_runs(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch, linger=2.0)
    export = await manager.acquire("alpha")
    manager.release(export)
    await trio.sleep(1.5)
    async with manager.hold_if_mounted("alpha") as got:
        assert got is export
        await trio.sleep(10)  # a slow statvfs outlives the linger
        assert export.mounted and fake.umount_calls == []
    assert export.holders == 0
    # The linger expired under the hold, so a fresh one starts when the hold ends.
    await trio.sleep(2.0 - 0.01)
    assert export.mounted
    await trio.sleep(0.02)
    assert state_of(export) is State.UNMOUNTED and fake.mount_count() == 1


async def test_hold_if_mounted_during_shutdown(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch)
    export = await manager.acquire("alpha")
    manager.closing = True  # what shutdown() sets first
    async with manager.hold_if_mounted("alpha") as got:
        assert got is None
    assert export.holders == 1


# -- shutdown -------------------------------------------------------------------------------


async def test_shutdown_unmounts_everything_and_refuses_new_acquires(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch, names=("alpha", "beta", "gamma"))
    alpha = await manager.acquire("alpha")
    beta = await manager.acquire("beta")
    manager.release(beta)  # lingering
    fake.fail("gamma")
    with pytest.raises(MountError):
        await manager.acquire("gamma")
    manager.release(alpha)
    await manager.shutdown()
    assert fake.mounted == set()
    assert sorted(fake.umount_calls) == sorted([alpha.target, beta.target])
    assert {e.name: e.state for e in manager.exports.values()} == {
        "alpha": State.UNMOUNTED,
        "beta": State.UNMOUNTED,
        "gamma": State.UNMOUNTED,
    }
    assert alpha.linger_scope is None and beta.linger_scope is None
    with pytest.raises(ShuttingDown) as info:
        await manager.acquire("alpha")
    assert errno_of(info.value) == errno.ESHUTDOWN
    assert alpha.holders == 0
    await trio.sleep(LINGER * 3)
    assert fake.mount_count() == 3 and fake.umount_count() == 2


async def test_shutdown_with_holders_still_unmounts(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    """Shutdown unmounts whatever the holders; a release afterwards schedules nothing."""
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch)
    export = await manager.acquire("alpha")
    await manager.shutdown()
    assert state_of(export) is State.UNMOUNTED and fake.mounted == set()
    manager.release(export)
    assert export.linger_scope is None
    await trio.sleep(LINGER * 2)
    assert fake.umount_count() == 1


async def test_shutdown_detaches_a_busy_mount(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch)
    export = await manager.acquire("alpha")
    manager.release(export)
    fake.busy = True
    await manager.shutdown()
    assert fake.umount_count() == 1
    assert fake.detach_calls == [export.target]
    assert fake.mounted == set() and state_of(export) is State.UNMOUNTED
    await trio.sleep(100)
    assert fake.umount_count() == 1  # no retry after shutdown


async def test_shutdown_waits_for_a_mount_in_progress(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch)
    fake.mount_delay = 5.0
    async with trio.open_nursery() as tasks:
        tasks.start_soon(manager.acquire, "alpha")
        await until(lambda: fake.mount_count() == 1)
        await manager.shutdown()
    assert fake.mounted == set()
    assert fake.mount_count() == 1 and fake.umount_count() == 1
    assert manager.get("alpha").state is State.UNMOUNTED


async def test_shutdown_with_nothing_mounted(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch, names=("alpha", "beta"))
    await manager.shutdown()
    assert fake.umount_calls == [] and fake.detach_calls == []
    assert all(state_of(e) is State.UNMOUNTED for e in manager.exports.values())


# -- the fake's own checks ------------------------------------------------------------------


async def test_fake_catches_an_unmount_with_holders(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    """The invariant checks of the fake can fail (so the tests above mean something)."""
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch)
    export = await manager.acquire("alpha")
    with pytest.raises(AssertionError, match="with 1 holder"):
        await manager._unmount(export)
    with pytest.raises(AssertionError, match="already mounted"):
        await fake.mount(export.config, export.target, 1.0)
    assert len(fake.violations) == 2


# -- randomized interleavings ---------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
async def test_random_interleavings_keep_the_invariants(
    tmp_path: Path,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    autojump_clock: object,
    seed: int,
) -> None:
    names = ("alpha", "beta", "gamma")
    manager, fake, _ = setup(tmp_path, nursery, monkeypatch, names=names, linger=2.0)
    fake.mount_delay = 0.3
    fake.umount_delay = 0.2
    rng = random.Random(seed)
    outcomes = {"ok": 0, "failed": 0}

    async def worker(wrng: random.Random) -> None:
        for _ in range(25):
            name = wrng.choice(names)
            try:
                if wrng.random() < 0.3:
                    async with manager.hold(name) as export:
                        assert export.mounted and export.holders >= 1
                        assert fake.is_mounted(export.target)
                        await trio.sleep(wrng.uniform(0, 0.5))
                else:
                    export = await manager.acquire(name)
                    assert export.mounted and fake.is_mounted(export.target)
                    try:
                        await trio.sleep(wrng.uniform(0, 4))
                        assert export.mounted  # never unmounted under a holder
                    finally:
                        manager.release(export)
                outcomes["ok"] += 1
            except MountError:
                outcomes["failed"] += 1
            await trio.sleep(wrng.choice([0, 0, wrng.uniform(0, 3)]))

    async def chaos(crng: random.Random) -> None:
        while True:
            await trio.sleep(crng.uniform(0, 2))
            roll = crng.random()
            if roll < 0.2:
                fake.fail(crng.choice(names))
            elif roll < 0.35:
                fake.stop_failing()
            elif roll < 0.6:
                fake.busy = not fake.busy

    async with trio.open_nursery() as outer:
        outer.start_soon(chaos, random.Random(rng.random()))
        async with trio.open_nursery() as workers:
            for _ in range(6):
                workers.start_soon(worker, random.Random(rng.random()))
        outer.cancel_scope.cancel()
    fake.stop_failing()
    fake.busy = False

    assert outcomes["ok"] > 0
    assert all(e.holders == 0 for e in manager.exports.values())
    await trio.sleep(2.0 + UNMOUNT_RETRY_MAX + 5)
    assert fake.violations == []
    assert fake.mounted == set()
    for export in manager.exports.values():
        assert export.state in (State.UNMOUNTED, State.FAILED), export.snapshot()
        assert export.linger_scope is None
    # Every successful mount was matched by exactly one successful unmount.
    assert sum(e.mount_count for e in manager.exports.values()) == fake.mounts_ok
    assert fake.mounts_ok == fake.umounts_ok > 0
