"""The daemon's lifecycle: one ``run()`` that owns the nursery, the FUSE session and shutdown.

Order of events::

    checks (mountpoint; a stale FUSE mount of a dead daemon is detached) -> the
    metrics_listen socket is bound (in use: exit 2, nothing touched) -> leftover backing
    mounts of removed exports are unmounted -> RLIMIT_NOFILE, PR_SET_IO_FLUSHER, pid file
    -> FUSE session init (mount appears)
    -> nursery: signal watcher + engine main loop (+ linger/unmount tasks of the core),
       health checks, the metrics endpoint; backing mounts of configured exports left by a
       dead daemon are adopted
    -> the mount answers its own stat of volumes/: READY=1 to systemd, "ready" to a waiting
       mount-helper parent; then STATUS= every 5 s and WATCHDOG=1 from the event loop
    -> SIGHUP: reload the config (a bad one is rejected whole)
    -> SIGTERM/SIGINT: stop, unless volumes are open: then refuse, log who holds what and
       keep serving; a second signal (or ``--force``) stops anyway
    -> STOPPING=1 -> warn about open volumes -> close the FUSE session (unmount; no new
       requests)
    -> close backing fds -> unmount backing mounts -> exit 0

Concurrency: everything runs in the trio thread (metrics scrapes too); the core offloads
blocking calls, and the readiness stat of the daemon's own mount runs in a worker thread
while the event loop serves it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from fusemux import libc
from fusemux.config import Config, ConfigError, load_config
from fusemux.core import metrics
from fusemux.core.exports import Health, State
from fusemux.core.fs import FileSystem
from fusemux.core.mappings import cleanup_leftover_mappings
from fusemux.core.mounter import MNT_DETACH, Mounter, SystemMounter, read_mountinfo, umount2
from fusemux.sdnotify import Notifier

log = logging.getLogger(__name__)
FUSE_FSTYPE = "fuse.fusemux"
PR_SET_IO_FLUSHER = 57
PID_FILE = "fusemux.pid"
# How long a stop request waits for RELEASEs still in flight before it counts open volumes.
RELEASE_GRACE = 1.0
# Open volumes need one backing fd each; a big host has thousands (plus dups for O_DIRECT).
WANT_NOFILE = 1 << 20


class StartupError(Exception):
    """An expected reason not to start, reported without a traceback.

    *exit_code* is 1, or 2 for a configured setting that cannot be used (``metrics_listen``
    in use): the exit codes of ``fusemux serve``.
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _set_io_flusher() -> None:
    # Memory reclaim must not wait on the daemon that serves the I/O it is trying to flush.
    try:
        libc.prctl(PR_SET_IO_FLUSHER, 1)
    except OSError as e:
        log.info("PR_SET_IO_FLUSHER not set (%s; it needs CAP_SYS_RESOURCE)", e.strerror)


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = WANT_NOFILE
    with contextlib.suppress(OSError, ValueError):
        want = min(want, int(Path("/proc/sys/fs/nr_open").read_text()))
    for new in ((max(want, soft), max(want, hard)), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, new)
            break
        except (OSError, ValueError):
            continue
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    level = logging.DEBUG if soft >= want else logging.INFO
    log.log(level, "RLIMIT_NOFILE is %d (wanted %d)", soft, want)


def _ancestors(pid: int) -> set[int]:
    out = set()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def _serving_pid(target: str, state_dir: Path) -> int | None:
    """The PID of a live fusemux daemon serving *target*, if any (never touches the mount).

    The pid file of this state_dir is asked first, then every process whose command line is
    ``... fusemux ... serve <target>`` or ``fusemux CONFIG <target> -o OPTIONS`` (mount(8)).
    """
    me = _ancestors(os.getpid())  # a sudo or shell wrapper of ours has the same args
    candidates: list[int] = []
    with contextlib.suppress(OSError, ValueError):
        candidates.append(int((state_dir / PID_FILE).read_text().split()[0]))
    candidates += [int(d) for d in os.listdir("/proc") if d.isdigit()]
    for pid in candidates:
        if pid in me:
            continue
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        text = [os.fsdecode(a) for a in args if a]
        if not any("fusemux" in a for a in text) or not ("serve" in text or "-o" in text):
            continue  # neither ``fusemux serve`` nor the mount-helper form (mounthelper.py)
        if any(os.path.normpath(os.path.join(cwd, a)) == target for a in text):
            return pid
    return None


def check_mountpoint(mountpoint: str, state_dir: Path) -> None:
    """Refuse a mountpoint that is not a directory or that a live fusemux daemon serves.

    A fusemux mount whose daemon is gone (kill -9) is stale: every access to it fails with
    ENOTCONN. It is found in mountinfo and detached with umount2, never stat()ed (a stat of
    a FUSE mount whose daemon is alive but stuck would block).
    """
    target = os.path.abspath(mountpoint)
    if any(m.mountpoint == target and m.fstype == FUSE_FSTYPE for m in read_mountinfo()):
        pid = _serving_pid(target, state_dir)
        if pid is not None:
            raise StartupError(f"{target} is already served by fusemux (pid {pid})")
        log.warning("%s: clearing the stale fusemux mount of a daemon that died", target)
        try:
            umount2(target, MNT_DETACH)
        except OSError as e:
            raise StartupError(f"cannot clear the stale mount at {target}: {e.strerror}") from None
    if not os.path.isdir(target):
        raise StartupError(f"mountpoint {target} is not a directory")


def _umount_bounded(path: str, timeout: float) -> None:
    """umount2(path) in a thread for at most *timeout* s; then (or if busy) detach lazily."""
    result: list[BaseException | None] = []

    def attempt() -> None:
        try:
            umount2(path, 0)
            result.append(None)
        except OSError as e:
            result.append(e)

    worker = threading.Thread(target=attempt, name="stale-umount", daemon=True)
    worker.start()
    worker.join(timeout)
    if result and result[0] is None:
        return
    reason = "timed out" if not result else f"failed: {result[0]}"
    log.warning("unmount of %s %s; detaching it lazily", path, reason)
    with contextlib.suppress(OSError):
        umount2(path, MNT_DETACH)


def clear_stale_backing_mounts(config: Config) -> None:
    """Unmount mounts under <state_dir>/mnt that belong to no configured export.

    A dead daemon's backing mounts of *configured* exports are adopted instead (see
    ExportManager.adopt_existing): they are idle and unmounted after the linger. No handle
    of this process can be on the others, so each gets a bounded plain unmount and, if that
    fails or hangs (a dead NFS server), a lazy detach.
    """
    prefix = str(config.mnt_dir) + "/"
    configured = {str(config.mnt_dir / name) for name in config.exports}
    stale = [
        m
        for m in read_mountinfo()
        if m.mountpoint.startswith(prefix) and m.mountpoint not in configured
    ]
    for entry in sorted(stale, key=lambda m: -len(m.mountpoint)):
        log.warning("unmounting stale backing mount %s (%s)", entry.mountpoint, entry.source)
        _umount_bounded(entry.mountpoint, config.mount_timeout)


@dataclass
class Options:
    """How ``serve`` was asked to behave."""

    debug_fuse: bool = False
    force: bool = False  # SIGTERM stops at once even with volumes open
    config_path: str = ""  # re-read on SIGHUP
    notifier: Notifier = field(default_factory=lambda: Notifier({}))  # systemd, if any
    # Called once the mount answers (the parent of a daemonized serve waits for it).
    on_ready: Callable[[], None] | None = None
    failure: str = ""  # why the daemon stopped on its own before it was ready


async def _reload(fs: FileSystem, path: str) -> None:
    if not path:
        log.warning("SIGHUP: no config file to reload")
        return
    try:
        new = await trio.to_thread.run_sync(load_config, path)
    except ConfigError as e:
        log.error(
            "SIGHUP: %s rejected, still serving the old configuration:\n  %s",
            path,
            "\n  ".join(e.problems),
        )
        return
    if new.state_dir != fs.config.state_dir:
        log.error(
            "SIGHUP: %s rejected, still serving the old configuration: state_dir cannot "
            "change while running (%s -> %s); restart instead",
            path,
            fs.config.state_dir,
            new.state_dir,
        )
        return
    startup_only = [
        key
        for key in ("metrics_listen", "log_format")
        if getattr(new, key) != getattr(fs.config, key)
    ]
    changes = fs.reload(new)
    changes += [f"{key}: changed; applied at the next start" for key in startup_only]
    log.info(
        "SIGHUP: reloaded %s (%d export(s))%s",
        path,
        len(new.exports),
        "".join(f"\n  {c}" for c in changes) or "; nothing changed",
    )


async def _watch_signals(
    fs: FileSystem,
    options: Options,
    terminate: Callable[[], None],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    refused = False
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()  # handlers installed: "serving" may be announced now
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                await _reload(fs, options.config_path)
                continue
            # A RELEASE reaches the daemon after the application's close() has returned:
            # give closes that are still on their way a moment before judging.
            with trio.move_on_after(RELEASE_GRACE):
                while fs.users():  # noqa: ASYNC110 - a short poll; RELEASE has no event
                    await trio.sleep(0.02)
            users = fs.users()
            users += [
                f"mapping {label} used by {', '.join(what)}"
                for label, what in (await fs.mappings.in_use_details()).items()
            ]
            if users and not options.force and not refused:
                refused = True
                options.notifier.status(f"stop refused: {len(users)} in use; {_status(fs)}")
                log.warning(
                    "received %s with %d open volume(s) or mapping(s) in use; NOT stopping "
                    "(send the signal again, or run serve with --force, to stop anyway): %s",
                    name,
                    len(users),
                    "; ".join(users),
                    extra={"op": "stop"},
                )
                continue
            log.info("received %s, shutting down", name)
            options.notifier.stopping(f"stopping ({name})")
            terminate()
            return


# How often STATUS= is refreshed for systemctl status.
STATUS_INTERVAL = 5.0
# How long the mount may take to answer its own first stat before startup is abandoned.
READY_TIMEOUT = 30.0


def _status(fs: FileSystem) -> str:
    """One line for systemd's STATUS=: exports, mounted ones, open volumes, unhealthy ones."""
    exports = list(fs.exports.exports.values())
    mounted = sum(e.state is State.MOUNTED for e in exports)
    sick = [e.name for e in exports if e.health is not Health.OK]
    line = f"{len(exports)} export(s), {mounted} mounted, {len(fs.open_volumes())} open volume(s)"
    return line + (f"; not ok: {', '.join(sick)}" if sick else "")


async def _announce_ready(
    fs: FileSystem, mountpoint: str, options: Options, terminate: Callable[[], None]
) -> None:
    """Tell systemd (READY=1) and a waiting parent that the mount answers, then keep STATUS=
    fresh. The mount answers once its own stat of ``volumes`` returns: the stat runs in a
    thread while the event loop serves it."""
    volumes = os.path.join(mountpoint, "volumes")
    with trio.move_on_after(READY_TIMEOUT) as waited:
        try:
            await trio.to_thread.run_sync(os.stat, volumes, abandon_on_cancel=True)
        except OSError as e:
            # The mount went away before it answered: a stop right after the start (the
            # session then ends by itself), or an unmount from outside. No READY=1; a
            # waiting parent sees the daemon exit without it.
            log.info("the mount at %s went away before it answered (%s)", mountpoint, e.strerror)
            return
    if waited.cancelled_caught:
        options.failure = f"the mount at {mountpoint} did not answer within {READY_TIMEOUT:g}s"
        log.error("%s; stopping", options.failure)
        terminate()
        return
    log.info("the mount at %s answers", mountpoint)
    options.notifier.ready(_status(fs))
    if options.on_ready is not None:
        options.on_ready()
    while True:
        await trio.sleep(STATUS_INTERVAL)
        options.notifier.status(_status(fs))


async def _watchdog(notifier: Notifier) -> None:
    """WATCHDOG=1 from the event loop itself: a wedged loop stops sending it."""
    while True:
        notifier.watchdog()
        await trio.sleep(notifier.watchdog_interval)


async def _serve(
    config: Config,
    mountpoint: str,
    mounter: Mounter,
    options: Options,
    metrics_sock: socket.socket | None = None,
) -> None:
    from fusemux import engines
    from fusemux.engines.kernel import EngineError

    fs = FileSystem(config, mounter)
    # Both block for a moment (a probe mount, then the kernel's INIT): nothing else runs yet.
    name, why = engines.select(config.engine, config.state_dir)
    kernel_passthrough = config.kernel_passthrough != "off"
    engine = engines.create(name, fs, mountpoint, options.debug_fuse, kernel_passthrough)
    if name == "passthrough" and not kernel_passthrough:
        why += "; kernel_passthrough = off: every read and write is served by fusemux"
    log.info("engine: %s (%s)", name, why)
    nfs = sorted(n for n, e in config.exports.items() if e.fstype.startswith("nfs"))
    if name == "pyfuse3" and nfs:
        log.warning(
            "the pyfuse3 engine keeps fcntl/flock locks inside this mount: locks on volumes of "
            "%s do not reach the NFS server, so other hosts do not see them (docs/reliability.md)",
            ", ".join(nfs),
        )
    try:
        engine.mount()
    except (EngineError, OSError) as e:
        raise StartupError(f"cannot mount {mountpoint} ({name} engine): {e}") from None
    async with trio.open_nursery() as nursery:
        fs.bind(nursery)
        await nursery.start(_watch_signals, fs, options, engine.terminate)
        nursery.start_soon(fs.health.run)
        if metrics_sock is not None:
            await nursery.start(metrics.serve, metrics_sock, fs)
            log.info("metrics at %s/metrics", config.metrics_listen)
        log.info(
            "serving %d export(s) at %s (state_dir %s, linger %gs)",
            len(config.exports),
            mountpoint,
            config.state_dir,
            config.linger,
        )
        nursery.start_soon(_announce_ready, fs, mountpoint, options, engine.terminate)
        if options.notifier.watchdog_interval > 0:
            nursery.start_soon(_watchdog, options.notifier)
        try:
            await engine.serve()
            log.info("FUSE session ended")
        finally:
            options.notifier.stopping()
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


def _prepare(config: Config) -> None:
    try:
        Path(config.mnt_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise StartupError(f"cannot create {config.mnt_dir}: {e.strerror}") from None
    cleanup_leftover_mappings(config)  # loop devices keep stale backing mounts busy
    clear_stale_backing_mounts(config)
    _set_io_flusher()
    _raise_nofile()


def run(
    config: Config,
    mountpoint: str,
    debug_fuse: bool = False,
    force: bool = False,
    config_path: str = "",
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Serve *config* at *mountpoint* until SIGTERM/SIGINT or an external unmount.

    *on_ready* is called once the mount answers (after systemd's READY=1, if under systemd).
    """
    mountpoint = os.path.abspath(mountpoint)
    options = Options(
        debug_fuse=debug_fuse,
        force=force,
        config_path=config_path,
        notifier=Notifier(),
        on_ready=on_ready,
    )
    check_mountpoint(mountpoint, config.state_dir)
    metrics_sock = None
    if config.metrics_listen is not None:
        try:  # before anything is touched: an address in use stops the start
            metrics_sock = metrics.bind(config.metrics_listen)
        except metrics.ListenError as e:
            raise StartupError(str(e), exit_code=2) from None
    try:
        _prepare(config)
        pid_file = config.state_dir / PID_FILE
        with contextlib.suppress(OSError):
            pid_file.write_text(f"{os.getpid()} {mountpoint}\n")
        try:
            trio.run(_serve, config, mountpoint, SystemMounter(), options, metrics_sock)
            if options.failure:
                raise StartupError(options.failure)
        finally:
            with contextlib.suppress(OSError):
                if pid_file.read_text().split()[0] == str(os.getpid()):
                    pid_file.unlink()
    finally:
        options.notifier.close()
        if metrics_sock is not None and config.metrics_listen is not None:
            metrics.close(metrics_sock, config.metrics_listen)
    log.info("stopped cleanly")
    return 0
