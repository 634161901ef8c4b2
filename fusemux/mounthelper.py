"""``fusemux CONFIG MOUNTPOINT -o OPTIONS``: the form mount(8) and fstab use.

This module owns the mount-helper entry point. ``mount -t fuse.fusemux CONFIG MNT`` (or the
fstab line ``/etc/fusemux/fusemux.toml /srv/fusemux fuse.fusemux defaults,_netdev 0 0``) runs
fuse3's ``/sbin/mount.fuse3``, which runs ``fusemux CONFIG MNT -o OPTIONS`` through
``/bin/sh``. mount(8) clears ``PATH`` for its helpers, so ``sh`` looks in its default path
(``/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin``): install ``fusemux`` (or
a link to it) there. mount.fuse3 strips ``_netdev``, ``nofail`` and other mount(8)-only
options and adds ``dev,suid`` as root; ``defaults`` may arrive as ``defaults`` or ``rw``.

What happens: the configuration is checked first (problems as ``FILE:LINE: reason``, exit
2). Then the process forks: the child becomes the daemon (a new session, stdin/stdout on
``/dev/null``, stderr to the ``log=`` file, by default ``<state_dir>/fusemux.log``, unless
stderr is systemd's journal stream) and runs ``serve``; the parent waits until the child's
mount answers, then exits 0, so mount(8) returns with the mount live. If the child fails to
start, the parent prints its reason and exits with its code (1, or 2 for bad settings).

Concurrency: runs before trio and before any thread exists (fork is safe here); the parent
only reads a pipe.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

from fusemux import logfmt
from fusemux.config import Config, ConfigError, load_config

# Options mount(8) or mount.fuse3 may pass that mean nothing to fusemux (accepted, ignored).
# Flags fusemux cannot honour (ro, nodev, nosuid, noexec, ...) are refused instead: the
# mount would silently not be what the fstab line says.
IGNORED = frozenset(
    {"defaults", "rw", "dev", "suid", "exec", "auto", "noauto", "nouser", "async", "_netdev"}
    | {"nofail", "relatime", "atime"}
)
IGNORED_PREFIXES = ("x-", "comment=", "subtype=", "fsname=")
# fusemux's own options.
OWN = ("force", "verbose", "log=FILE")


class UsageError(Exception):
    """A bad mount-helper invocation (exit 2)."""


@dataclass
class HelperArgs:
    config: str
    mountpoint: str
    force: bool = False
    verbose: bool = False
    log: str = ""  # the daemon's log file; "" = the default


def is_helper_form(argv: list[str]) -> bool:
    """Whether *argv* is ``CONFIG MNT ...`` rather than ``COMMAND ...``."""
    positional = [a for a in argv if not a.startswith("-")]
    return bool(argv) and not argv[0].startswith("-") and len(positional) >= 2


def parse(argv: list[str]) -> HelperArgs:
    """``CONFIG MOUNTPOINT [-o OPTS]...`` (also ``-oOPTS``); raises UsageError."""
    positional: list[str] = []
    options: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "-o":
            if i + 1 >= len(argv):
                raise UsageError("-o needs an option list")
            options += argv[i + 1].split(",")
            i += 2
            continue
        if arg.startswith("-o"):
            options += arg[2:].split(",")
        elif arg in ("-n", "-s", "-f", "-v"):
            pass  # mount(8) flags a helper may get: no mtab, sloppy, fake, verbose
        elif arg.startswith("-"):
            raise UsageError(f"unknown argument {arg!r}")
        else:
            positional.append(arg)
        i += 1
    if len(positional) != 2:
        raise UsageError(
            "expected CONFIG MOUNTPOINT [-o OPTIONS] (as mount.fuse3 runs it), "
            f"got {len(positional)} argument(s)"
        )
    config, mountpoint = positional
    if not os.path.isabs(config):
        raise UsageError(
            f"the config path {config!r} must be absolute (it is the source field of the "
            "fstab line or of mount -t fuse.fusemux, which mount(8) does not resolve)"
        )
    args = HelperArgs(config=config, mountpoint=os.path.abspath(mountpoint))
    unknown = []
    for opt in (o.strip() for o in options):
        if not opt or opt in IGNORED or opt.startswith(IGNORED_PREFIXES):
            continue
        if opt == "force":
            args.force = True
        elif opt == "verbose":
            args.verbose = True
        elif opt.startswith("log="):
            args.log = opt[4:]
            if not os.path.isabs(args.log):
                raise UsageError(f"log={args.log}: the log file must be an absolute path")
        else:
            unknown.append(opt)
    if unknown:
        raise UsageError(
            f"unknown mount option(s) {', '.join(map(repr, unknown))}; fusemux takes "
            f"{', '.join(OWN)} and ignores {', '.join(sorted(IGNORED))}, "
            "x-*, comment=, subtype= and fsname="
        )
    return args


def main(argv: list[str]) -> int:
    """The mount-helper form: check, fork, wait for the child's mount; see the docstring."""
    try:
        args = parse(argv)
    except UsageError as e:
        print(f"fusemux: {e}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 2
    os.environ.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    log_path = args.log or str(config.state_dir / "fusemux.log")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_end)
        code = 1
        try:
            code = _child(args, config, log_path, write_end)
        finally:
            os._exit(code)
    os.close(write_end)
    return _parent(pid, read_end, log_path)


def _parent(pid: int, read_end: int, log_path: str) -> int:
    """Wait for the child's word: ``R`` (ready) or ``E<reason>``; EOF means it died."""
    data = b""
    with os.fdopen(read_end, "rb") as pipe:
        while chunk := pipe.read(4096):
            data += chunk
            if data.startswith(b"R"):
                return 0  # the daemon serves; it is no child of ours to wait for any more
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if data.startswith(b"E"):
        print(f"fusemux: {data[1:].decode(errors='replace')}", file=sys.stderr)
    else:
        print(
            f"fusemux: the daemon exited ({code}) before its mount was ready; see {log_path}",
            file=sys.stderr,
        )
    return code if code > 0 else 1


def _child(args: HelperArgs, config: Config, log_path: str, pipe: int) -> int:
    from fusemux.daemon import StartupError, run

    os.setsid()
    os.chdir("/")
    journal = logfmt.under_journald(sys.stderr)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    if not journal:
        try:
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        except OSError as e:
            os.write(pipe, f"Ecannot open the log file {log_path}: {e.strerror}".encode())
            return 1
        os.dup2(log_fd, 2)
        os.close(log_fd)
    os.close(null)
    logfmt.setup(args.verbose, config.log_format)
    told = False

    def ready() -> None:
        nonlocal told
        if not told:
            told = True
            with contextlib.suppress(OSError):
                os.write(pipe, b"R")
                os.close(pipe)

    try:
        return run(
            config,
            args.mountpoint,
            force=args.force,
            config_path=args.config,
            on_ready=ready,
        )
    except StartupError as e:
        print(f"fusemux: {e}", file=sys.stderr)
        if not told:
            with contextlib.suppress(OSError):
                os.write(pipe, b"E" + str(e).encode())
        return e.exit_code
    except BaseException as e:
        if not told:
            with contextlib.suppress(OSError):
                os.write(pipe, f"Eunexpected error: {e!r} (see {log_path})".encode())
        raise
