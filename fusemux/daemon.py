"""The daemon's lifecycle: one ``run()`` that owns the nursery, the FUSE session and shutdown.

Order of events::

    checks (mountpoint, stale backing mounts) -> FUSE session init (mount appears)
    -> nursery: signal watcher + engine main loop (+ linger/unmount tasks of the core)
    -> on SIGTERM/SIGINT/external unmount: engine stops
    -> warn about open volumes -> close the FUSE session (unmount; no new requests)
    -> close backing fds -> unmount backing mounts -> exit 0

Concurrency: everything runs in the trio thread; the core offloads blocking calls.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

import trio

from fusemux.config import Config
from fusemux.core.fs import FileSystem
from fusemux.core.mappings import cleanup_leftover_mappings
from fusemux.core.mounter import MNT_DETACH, Mounter, SystemMounter, read_mountinfo, umount2

log = logging.getLogger(__name__)
FUSE_FSTYPE = "fuse.fusemux"
PR_SET_IO_FLUSHER = 57


class StartupError(Exception):
    """An expected reason not to start, reported without a traceback."""


def _set_io_flusher() -> None:
    # Memory reclaim must not wait on the daemon that serves the I/O it is trying to flush.
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        log.debug("PR_SET_IO_FLUSHER not set: %s", os.strerror(ctypes.get_errno()))


def check_mountpoint(mountpoint: str) -> None:
    """Refuse a mountpoint that is not a directory or that already carries a fusemux mount.

    mountinfo is compared as strings first: a stale FUSE mount must never be stat()ed.
    """
    target = os.path.abspath(mountpoint)
    if any(m.mountpoint == target and m.fstype == FUSE_FSTYPE for m in read_mountinfo()):
        raise StartupError(
            f"{target} already has a fusemux mount; stop that daemon, or clear a stale one "
            f"with 'fusermount3 -u {target}'"
        )
    if not os.path.isdir(target):
        raise StartupError(f"mountpoint {target} is not a directory")


def clear_stale_backing_mounts(config: Config) -> None:
    """Unmount backing mounts left under <state_dir>/mnt by a daemon that died.

    No handle of this process can be on them yet, so a plain unmount is safe; if something
    else keeps one busy, it is detached lazily rather than served twice.
    """
    prefix = str(config.mnt_dir) + "/"
    stale = [m for m in read_mountinfo() if m.mountpoint.startswith(prefix)]
    for entry in sorted(stale, key=lambda m: -len(m.mountpoint)):
        log.warning("unmounting stale backing mount %s (%s)", entry.mountpoint, entry.source)
        try:
            umount2(entry.mountpoint, 0)
        except OSError:
            with contextlib.suppress(OSError):
                umount2(entry.mountpoint, MNT_DETACH)


async def _watch_signals(terminate: Callable[[], None]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            terminate()
            return


async def _serve(config: Config, mountpoint: str, mounter: Mounter, debug_fuse: bool) -> None:
    from fusemux.engines import pyfuse3 as engine

    fs = FileSystem(config, mounter)
    try:
        engine.mount(fs, mountpoint, debug=debug_fuse)
    except RuntimeError as e:
        # pyfuse3.init raises RuntimeError when the kernel refuses the FUSE mount.
        raise StartupError(f"cannot mount {mountpoint}: {e}") from None
    async with trio.open_nursery() as nursery:
        fs.bind(nursery)
        log.info(
            "serving %d export(s) at %s (state_dir %s, linger %gs)",
            len(config.exports),
            mountpoint,
            config.state_dir,
            config.linger,
        )
        nursery.start_soon(_watch_signals, engine.terminate)
        try:
            await engine.serve()
            log.info("FUSE session ended")
        finally:
            open_now = fs.open_volumes()
            if open_now:
                log.warning(
                    "shutting down with %d volume(s) still open: %s",
                    len(open_now),
                    ", ".join(open_now),
                )
            # No new requests from here on; then close backing fds and unmount exports.
            engine.close(unmount=True)
            with trio.CancelScope(shield=True):
                await fs.shutdown()
            nursery.cancel_scope.cancel()


def run(config: Config, mountpoint: str, debug_fuse: bool = False) -> int:
    """Serve *config* at *mountpoint* until SIGTERM/SIGINT or an external unmount."""
    mountpoint = os.path.abspath(mountpoint)
    check_mountpoint(mountpoint)
    try:
        Path(config.mnt_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise StartupError(f"cannot create {config.mnt_dir}: {e.strerror}") from None
    cleanup_leftover_mappings(config)  # loop devices keep stale backing mounts busy
    clear_stale_backing_mounts(config)
    _set_io_flusher()
    trio.run(_serve, config, mountpoint, SystemMounter(), debug_fuse)
    log.info("stopped cleanly")
    return 0
