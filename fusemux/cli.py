"""The ``fusemux`` command line: serve, status, check, mount, unmount, map, unmap and demo.

This module owns argument parsing, exit codes and what an operator reads on the terminal.
``status``, ``map`` and ``unmap`` are thin clients over the ``user.fusemux.*`` xattrs of a
running mount; they never talk to the daemon any other way. Expected failures print one
line and exit non-zero, without a traceback.

Exit codes: 0 success, 1 the operation failed (for example a mountpoint that is not a
fusemux mount), 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import threading
import time
from typing import Any

from fusemux import __version__, logfmt
from fusemux.config import Config, ConfigError, load_config

PREFIX = "user.fusemux."
COMMANDS = ("serve", "mount", "unmount", "status", "check", "map", "unmap", "demo")
log = logging.getLogger("fusemux")


def _setup_logging(verbose: bool, fmt: str = "text") -> None:
    logfmt.setup(verbose, fmt)


def _load(path: str) -> Config | None:
    """The config at *path*, or None after printing every problem as FILE:LINE: reason."""
    try:
        return load_config(path)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 2
    print(f"{args.config}: OK, {len(config.exports)} export(s)")
    for name, export in config.exports.items():
        opts = f" -o {export.mount_options()}" if export.mount_options() else ""
        print(f"  {name}: mount -t {export.fstype}{opts} {export.source}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from fusemux.daemon import StartupError, run

    _setup_logging(args.verbose)
    config = _load(args.config)
    if config is None:
        return 2
    _setup_logging(args.verbose, config.log_format)
    try:
        return run(
            config,
            args.mountpoint,
            debug_fuse=args.debug_fuse,
            force=args.force,
            config_path=args.config,
        )
    except StartupError as e:
        print(f"fusemux: {e}", file=sys.stderr)
        return e.exit_code


def _getx(path: str, key: str) -> str:
    try:
        return os.getxattr(path, PREFIX + key).decode("utf-8", "surrogateescape")
    except OSError:
        return ""


# capacity/free need a statvfs of the backing filesystem, which fusemux gives up after 1 s on
# a sick export; status waits for them only briefly and reports the export as not answering.
SLOW_KEYS = ("capacity", "free")
SLOW_WAIT = 0.5


def _slow_keys(wanted: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """Read the slow *wanted* keys ({path: keys}) of all exports at once, in daemon threads,
    waiting at most SLOW_WAIT seconds in all; a path that did not answer in time gets
    ``{"backing_answers": False}``."""
    found: dict[str, dict[str, str]] = {path: {} for path in wanted}
    workers = []
    for path, keys in wanted.items():
        if not keys:
            continue

        def read(path: str = path, keys: list[str] = keys) -> None:
            for k in keys:
                found[path][k] = value = _getx(path, k)
                if not value:
                    return  # the backing filesystem did not answer: do not ask again

        worker = threading.Thread(target=read, daemon=True)
        worker.start()
        workers.append((path, worker))
    deadline = time.monotonic() + SLOW_WAIT
    out: dict[str, dict[str, Any]] = {}
    for path, worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
        values = dict(found[path])
        if worker.is_alive() or len(values) < len(wanted[path]) or "" in values.values():
            out[path] = {"backing_answers": False}
        else:
            out[path] = values
    return out


def collect_status(mountpoint: str) -> dict[str, Any]:
    """Everything ``status`` shows, read through the xattrs of the mount."""
    root = os.path.abspath(mountpoint)
    try:
        version = os.getxattr(root, PREFIX + "version").decode()
    except OSError as e:
        raise OSError(e.errno, f"{root} is not a running fusemux mount ({e.strerror})") from None
    status: dict[str, Any] = {
        "mountpoint": root,
        "version": version,
        "pid": int(_getx(root, "pid") or 0),
        "engine": _getx(root, "engine") or "",
        "exports": [],
    }
    volumes_dir = os.path.join(root, "volumes")
    names = sorted(os.listdir(volumes_dir))
    listed = {}
    for name in names:
        path = os.path.join(volumes_dir, name)
        listed[path] = [k.removeprefix(PREFIX) for k in os.listxattr(path) if k.startswith(PREFIX)]
    slow = _slow_keys({p: [k for k in keys if k in SLOW_KEYS] for p, keys in listed.items()})
    for name in names:
        path = os.path.join(volumes_dir, name)
        info: dict[str, Any] = {"name": name}
        for key in listed[path]:
            if key not in SLOW_KEYS:
                info[key] = _getx(path, key)
        info.update(slow.get(path, {}))
        for key in ("holders", "mount_count", "capacity", "free"):
            if info.get(key, "") != "":
                info[key] = int(info[key])
        # One export-level key carries the volumes' details: reading each volume's keys
        # would look the volume up, which blocks while its NFS server is down.
        detail = json.loads(info.pop("status_json", "") or '{"open": {}, "mappings": {}}')
        info.pop("open_volumes", None)
        info.pop("mapped_volumes", None)
        info["open_volumes"] = [
            {"name": vol, "open_count": d["open_count"], "openers": d["openers"]}
            for vol, d in detail["open"].items()
        ]
        info["mappings"] = [{"name": vol, **d} for vol, d in detail["mappings"].items()]
        info["locks"] = int(detail.get("locks", 0))  # held through fusemux on its volumes
        status["exports"].append(info)
    return status


def _print_status(status: dict[str, Any]) -> None:
    engine = f", {status['engine']} engine" if status.get("engine") else ""
    print(f"fusemux {status['version']} (pid {status['pid']}{engine}) at {status['mountpoint']}")
    rows = [("EXPORT", "STATE", "HEALTH", "HOLDERS", "MOUNTS", "SOURCE", "LAST ERROR")]
    for e in status["exports"]:
        rows.append(
            (
                e["name"],
                e.get("state", "?"),
                e.get("health", "?"),
                str(e.get("holders", "")),
                str(e.get("mount_count", "")),
                f"{e.get('fstype', '')}:{e.get('source', '')}",
                e.get("last_error", "") or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:6], widths, strict=False)) + "  " + r[6])
    for e in status["exports"]:
        if e.get("backing_answers") is False:
            print(f"not answering: {e['name']} (its backing filesystem did not answer a statvfs)")
    for e in status["exports"]:
        for v in e["open_volumes"]:
            openers = ", ".join(v["openers"]) or "-"
            print(f"open: {e['name']}/{v['name']} x{v['open_count']} by {openers}")
    for e in status["exports"]:
        if e.get("locks"):
            print(f"locks: {e['name']} {e['locks']} held through fusemux")
    for e in status["exports"]:
        for m in e.get("mappings", []):
            pid = f" (qemu-nbd pid {m['pid']})" if m["pid"] else ""
            devices = " ".join(m["mapping"]) or "-"
            print(f"mapped: {e['name']}/{m['name']} {m['options']} -> {devices}{pid}")


def cmd_status(args: argparse.Namespace) -> int:
    try:
        status = collect_status(args.mountpoint)
    except OSError as e:
        print(f"fusemux: {e.strerror or e}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(status, sys.stdout, indent=2)
        print()
    else:
        _print_status(status)
    return 0


def cmd_ctl(args: argparse.Namespace) -> int:
    """``fusemux mount|unmount MOUNTPOINT EXPORT``: one setxattr of user.fusemux.ctl."""
    path = os.path.join(os.path.abspath(args.mountpoint), "volumes", args.export)
    try:
        os.setxattr(path, PREFIX + "ctl", args.verb.encode())
    except OSError as e:
        reason = {
            errno.EBUSY: "it has other holders, or its backing mount is busy",
            errno.EPERM: "only root may do that",
            errno.ENOENT: "no such export, or not a fusemux mount",
        }.get(e.errno or 0, "")
        detail = f" ({reason})" if reason else ""
        print(
            f"fusemux: {args.verb} {args.export}: {e.strerror}{detail}",
            file=sys.stderr,
        )
        return 1
    state = _getx(path, "state")
    print(f"{args.export}: {state}" + (" (pinned)" if _getx(path, "pinned") == "1" else ""))
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    """Request a mapping through ``user.fusemux.map`` and print what it got."""
    value = args.kind + (",ro" if args.ro else "") + (",partitions" if args.partitions else "")
    try:
        os.setxattr(args.path, PREFIX + "map", value.encode())
        mapping = os.getxattr(args.path, PREFIX + "mapping").decode("utf-8", "surrogateescape")
    except OSError as e:
        print(f"fusemux: map {args.path}: {e.strerror}", file=sys.stderr)
        return 1
    for item in mapping.split(","):
        print(item)
    return 0


def cmd_unmap(args: argparse.Namespace) -> int:
    """End a mapping through ``user.fusemux.unmap``; prints what was unmapped."""
    try:
        mapping = os.getxattr(args.path, PREFIX + "mapping").decode("utf-8", "surrogateescape")
        os.setxattr(args.path, PREFIX + "unmap", b"")
    except OSError as e:
        print(f"fusemux: unmap {args.path}: {e.strerror}", file=sys.stderr)
        return 1
    for item in mapping.split(","):
        if item:
            print(item)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fusemux.demo import run_demo

    _setup_logging(args.verbose)
    return run_demo(args.dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusemux",
        description="One FUSE mount that serves every volume of every configured export.",
    )
    parser.add_argument("--version", action="version", version=f"fusemux {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="serve the mount in the foreground until SIGTERM")
    p.add_argument("mountpoint")
    p.add_argument("--config", required=True, help="TOML configuration file")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--debug-fuse", action="store_true", help="libfuse debug output")
    p.add_argument(
        "--force",
        action="store_true",
        help="stop on the first SIGTERM/SIGINT even while volumes are open",
    )
    p.set_defaults(func=cmd_serve)

    for verb, what in (
        ("mount", "mount an export now and pin it"),
        ("unmount", "unpin and unmount an export now"),
    ):
        p = sub.add_parser(verb, help=what + " (root; the user.fusemux.ctl xattr)")
        p.add_argument("mountpoint")
        p.add_argument("export")
        p.set_defaults(func=cmd_ctl, verb=verb)

    p = sub.add_parser("status", help="show exports, states, holders and open volumes")
    p.add_argument("mountpoint")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("check", help="validate a configuration file")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("map", help="map a volume to a loop device or an NBD URI (root)")
    p.add_argument("path", help="MOUNTPOINT/volumes/EXPORT/VOLUME")
    p.add_argument("--kind", choices=("loop", "nbd", "auto"), default="auto")
    p.add_argument("--ro", action="store_true", help="read-only mapping")
    p.add_argument("--partitions", action="store_true", help="loop: add partition devices")
    p.set_defaults(func=cmd_map)

    p = sub.add_parser("unmap", help="end the mapping of a volume (root)")
    p.add_argument("path", help="MOUNTPOINT/volumes/EXPORT/VOLUME")
    p.set_defaults(func=cmd_unmap)

    p = sub.add_parser("demo", help="build the embedded demo area and serve it")
    p.add_argument("--dir", default="/var/tmp/fusemux-demo", help="where to build the demo")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fusemux import mounthelper

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv and argv[0] not in COMMANDS and mounthelper.is_helper_form(argv):
        return mounthelper.main(argv)  # CONFIG MOUNTPOINT -o OPTS: mount(8), fstab
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return rc
