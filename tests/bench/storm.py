"""Concurrency storm tool: a long storm against a real fusemux daemon, with its figures.

This file owns the command line only; the storm itself (workers, canary, sampler, checks) is
:mod:`tests.stormlib`, shared with the CI test ``tests/mount/test_storm.py``.

    .venv/bin/python tests/bench/storm.py --duration 600 [--workers 16] [--exports 4]
        [--volumes-per-export 4] [--json FILE]

It needs root (it mounts). Everything lives in a fresh directory under /tmp, which is
removed at the end; the daemon and every child process are ended by PID, and whatever the
daemon left mounted, and any loop device backed by a file in that directory, is undone in
``finally``. The exit status is 0 only if every invariant held.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fusemux.core import loopdev  # noqa: E402
from tests.mount.harness import Daemon, loops_backed_by  # noqa: E402
from tests.stormlib import StormConfig, format_result, run_storm  # noqa: E402


def detach_loops(base: Path) -> list[str]:
    """Detach loop devices whose backing file lies under *base*; the ones found."""
    found = loops_backed_by(lambda backing: backing.startswith(str(base) + "/"))
    for dev in found:
        with contextlib.suppress(OSError):
            loopdev.detach(dev)
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, required=True, help="storm length in seconds")
    p.add_argument("--workers", type=int, default=16, help="worker processes (default 16)")
    p.add_argument("--exports", type=int, default=4, help="exports, ext4/bind alternately")
    p.add_argument("--volumes-per-export", type=int, default=4)
    p.add_argument("--blocks", type=int, default=64, help="4 KiB blocks per volume")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--engine", choices=("pyfuse3", "passthrough"), default="pyfuse3", help="FUSE engine"
    )
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("storm.py needs root (it mounts)", file=sys.stderr)
        return 2
    if args.workers < 1 or args.exports < 1 or args.volumes_per_export < 1:
        p.error("--workers, --exports and --volumes-per-export must be at least 1")
    cfg = StormConfig(
        duration=args.duration,
        workers=args.workers,
        exports=args.exports,
        volumes_per_export=args.volumes_per_export,
        blocks=args.blocks,
        seed=args.seed,
    )
    base = Path(tempfile.mkdtemp(prefix="fusemux-storm-", dir="/tmp"))
    daemon = Daemon(base, engine=args.engine)
    leftovers: list[str] = []
    try:
        result = run_storm(daemon, cfg, say=lambda s: print(s, flush=True))
    finally:
        try:
            daemon.cleanup()
        finally:
            leftovers = daemon.leftover_mounts() + detach_loops(base)
            if leftovers:
                print(f"left behind, not removing {base}: {leftovers}", file=sys.stderr)
            else:
                shutil.rmtree(base, ignore_errors=True)
    print(format_result(result))
    if args.json:
        args.json.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    return 0 if result.ok and not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
