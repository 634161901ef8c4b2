"""Tier (c): the daemon's event lines carry ``key=value`` fields (export, volume, op, pid,
comm, errno), and ``log_format = "json"`` writes one JSON object per line with the same
fields."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.mount.harness import Daemon

VOL = b"log-test\n" * 100


def child_reads(path: Path) -> int:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; open(sys.argv[1], 'rb').read()", str(path)]
    )
    assert proc.wait(30) == 0
    return proc.pid


def setup(daemon: Daemon, tmp_path: Path, **top: Any) -> None:
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.exports["bad"] = {
        "source": str(tmp_path / "nowhere"),
        "fstype": "none",
        "options": "bind",
    }
    daemon.allowed_warnings.append(r"export bad: mount of .* failed")
    daemon.write_config(linger=0, **top)


def test_event_lines_carry_fields(daemon: Daemon, tmp_path: Path) -> None:
    setup(daemon, tmp_path)
    daemon.start()
    pid = child_reads(daemon.volume("gold", "a"))
    with contextlib.suppress(OSError):
        open(daemon.volume("bad", "x"), "rb")
    daemon.wait_unmounted("gold")
    lines = daemon.log().splitlines()

    def one(*parts: str) -> str:
        found = [line for line in lines if all(p in line for p in parts)]
        assert found, f"no line with {parts}:\n" + "\n".join(lines)
        return found[0]

    one(" INFO ", "export gold: mounted", " export=gold op=mount")
    one(" INFO ", "export gold: unmounted", " export=gold op=unmount")
    opened = one(" DEBUG ", "open gold/a", " export=gold volume=a op=open", f" pid={pid} ")
    assert opened.split(" comm=")[1].startswith("python")
    one(" DEBUG ", "release gold/a", " export=gold volume=a op=release", f" pid={pid} ")
    failed = one(" WARNING ", "export bad: mount of", " export=bad op=mount errno=E")
    assert failed.rsplit("errno=", 1)[1].isupper()
    # a failed request at the engine's edge: its opcode and errno
    one(" DEBUG ", "fusemux.engines.", " op=lookup errno=E")


def test_json_log_format(daemon: Daemon, tmp_path: Path) -> None:
    setup(daemon, tmp_path, log_format="json")
    daemon.start()
    pid = child_reads(daemon.volume("gold", "a"))
    daemon.wait_unmounted("gold")
    records = [json.loads(line) for line in daemon.log().splitlines()]  # every line is JSON
    assert {r["level"] for r in records} >= {"INFO", "DEBUG"}
    mounted = [r for r in records if r["message"].startswith("export gold: mounted")]
    assert mounted and mounted[0]["export"] == "gold" and mounted[0]["op"] == "mount"
    opened = [r for r in records if r.get("op") == "open" and r.get("volume") == "a"]
    assert opened and opened[0]["pid"] == pid and opened[0]["export"] == "gold"
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
