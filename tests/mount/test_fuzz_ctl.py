"""Tier (c): bad input against the real daemon and the real ``fusemux check``.

* 200+ hypothesis-generated malformed ``user.fusemux.ctl`` values, set with ``os.setxattr``
  on export directories of a running daemon, each get ``EINVAL``; after every one the daemon
  is alive and both exports (one pinned and mounted, one unmounted) are exactly as before;
  the log has no traceback or error (the ``daemon`` fixture checks it), and ``mount`` /
  ``unmount`` still work afterwards.
* A non-root caller (``setpriv`` to uid 65534) gets ``EPERM`` for valid and invalid values
  alike, and nothing changes.
* ``python -m fusemux check --config FILE`` on ~20 malformed configs exits 2, prints only
  ``FILE:LINE: reason`` lines on stderr and never a traceback.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from tests.conftest import PUBLIC_DIR
from tests.mount.harness import Daemon, as_nobody, wait_for

CTL = "user.fusemux.ctl"
VOL = b"fuzz-volume\n" * 64
STATE_KEYS = ("state", "holders", "pinned", "mount_count", "last_error")


def ctl(daemon: Daemon, export: str, value: bytes) -> int:
    """setxattr ctl; 0 on success, else the errno."""
    try:
        os.setxattr(daemon.volumes(export), CTL, value)
    except OSError as e:
        return e.errno or -1
    return 0


def export_state(daemon: Daemon, export: str) -> dict[str, object]:
    path = daemon.volumes(export)
    state: dict[str, object] = {k: daemon.xattr(path, k) for k in STATE_KEYS}
    state["backing_mounted"] = daemon.backing_mounted(export)
    return state


def valid_ctl(value: bytes) -> bool:
    try:
        return value.decode("ascii").strip() in ("mount", "unmount")
    except UnicodeDecodeError:
        return False


def log_safe(value: bytes) -> bool:
    """The harness flags log lines containing these words; a refused value is logged."""
    shown = value[:64].decode("ascii", "backslashreplace")
    return not any(w in shown for w in ("Traceback", "ERROR", "CRITICAL"))


garbage_ctl = st.one_of(
    st.binary(max_size=512),
    st.sampled_from(
        [
            b"",
            b"\0",
            b"mount\0",
            b"\0mount",
            b"MOUNT",
            b"Unmount",
            b"mount unmount",
            b"mount\nunmount",
            b"umount",
            b"pin",
            b"../mount",
            b"/mount",
            b"mount/..",
            b"\xffmount",
            "m\u00f6unt".encode(),
            b"mount" * 800,
            b"x" * 4000,
            b"-1",
            b"1",
        ]
    ),
    st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.builds(lambda a, b: a + b"mount" + b, st.binary(max_size=3), st.binary(max_size=3)),
).filter(lambda v: not valid_ctl(v) and log_safe(v))


def test_fuzzed_ctl_values_get_einval_and_change_nothing(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.add_bind_export("silver", {"b": VOL})
    daemon.write_config(linger=0)
    daemon.allowed_warnings.append(r"ctl value .* refused")
    daemon.start()
    assert ctl(daemon, "silver", b"mount") == 0  # silver: pinned and mounted
    before = {name: export_state(daemon, name) for name in ("gold", "silver")}
    assert before["silver"]["state"] == "mounted" and before["silver"]["pinned"] == "1"
    assert before["gold"]["state"] == "unmounted" and not before["gold"]["backing_mounted"]
    tried: list[bytes] = []

    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(value=garbage_ctl, export=st.sampled_from(["gold", "silver"]))
    def one(value: bytes, export: str) -> None:
        tried.append(value)
        assert ctl(daemon, export, value) == errno.EINVAL, value
        assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon died"
        assert export_state(daemon, export) == before[export], value

    one()
    assert len(tried) >= 200
    assert {name: export_state(daemon, name) for name in ("gold", "silver")} == before
    assert "Traceback" not in daemon.log()
    assert "ctl value" in daemon.log() and "refused" in daemon.log()
    # The control path still works.
    assert ctl(daemon, "gold", b"mount\n") == 0
    assert export_state(daemon, "gold")["state"] == "mounted"
    assert daemon.backing_mounted("gold")
    with open(daemon.volume("gold", "a"), "rb") as f:
        assert f.read() == VOL
    # FUSE's release arrives after close() returns: wait until only the pin holds gold.
    wait_for(lambda: daemon.xattr(daemon.volumes("gold"), "holders") == "1", 5, "the release")
    assert ctl(daemon, "gold", b"unmount") == 0
    assert ctl(daemon, "silver", b"unmount") == 0
    for name in ("gold", "silver"):
        state = export_state(daemon, name)
        assert state["state"] == "unmounted" and state["pinned"] == "0", state
        assert not state["backing_mounted"]


def test_non_root_ctl_gets_eperm_and_changes_nothing(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.add_bind_export("silver", {"b": VOL})
    daemon.write_config(linger=0)
    daemon.allowed_warnings.append(r"ctl refused for uid")
    # pytest's tmp dirs are 0700: serve at a mountpoint other users can reach.
    PUBLIC_DIR.mkdir(mode=0o755, exist_ok=True)
    PUBLIC_DIR.chmod(0o755)
    daemon.mnt = Path(tempfile.mkdtemp(dir=PUBLIC_DIR))
    daemon.mnt.chmod(0o755)
    daemon.start()
    assert ctl(daemon, "silver", b"mount") == 0
    before = {name: export_state(daemon, name) for name in ("gold", "silver")}
    values = [b"mount", b"unmount", b"mount\n", b"garbage", b"", b"\xff\0"]
    code = (
        "import os,sys\n"
        "codes = []\n"
        "for path in sys.argv[1:]:\n"
        "    for value in (b'mount', b'unmount', b'mount\\n', b'garbage', b'', b'\\xff\\0'):\n"
        "        try:\n"
        "            os.setxattr(path, 'user.fusemux.ctl', value)\n"
        "            codes.append(0)\n"
        "        except OSError as e:\n"
        "            codes.append(e.errno)\n"
        "print(' '.join(map(str, codes)))\n"
    )
    result = as_nobody(
        "/usr/bin/python3", "-c", code, daemon.volumes("gold"), daemon.volumes("silver")
    )
    assert result.returncode == 0, result.stderr
    codes = [int(c) for c in result.stdout.split()]
    assert codes == [errno.EPERM] * (2 * len(values)), codes
    assert {name: export_state(daemon, name) for name in ("gold", "silver")} == before
    assert ctl(daemon, "silver", b"unmount") == 0


# -- fusemux check on malformed configs ------------------------------------------------------

LONG = "n" * 300
BAD_CONFIGS: dict[str, bytes] = {
    "binary": b"\x00\xff\xfe\x01garbage",
    "invalid_utf8": b"# ok\nlinger = 1\n# \xff\xfe\n",
    "nul_in_toml": b"linger = 1\0\n",
    "negative_linger": b"linger = -1\n",
    "string_linger": b'linger = "10"\n',
    "inf_linger": b"linger = 1e400\n",
    "zero_timeout": b"mount_timeout = 0\n",
    "nan_timeout": b"mount_timeout = nan\n",
    "relative_state_dir": b'state_dir = "run/fusemux"\n',
    "typed_state_dir": b"state_dir = [1, 2]\n",
    "unknown_keys": b"bogus = 1\n[exports.a]\nsource = 'h:/a'\nmystery = true\n",
    "dotdot_export": b'[exports."../etc"]\nsource = "h:/x"\n',
    "slash_export": b'[exports."a/b"]\nsource = "h:/x"\n',
    "nul_export": b'[exports."a\\u0000b"]\nsource = "h:/x"\n',
    "long_export": f'[exports."{LONG}"]\nsource = "h:/x"\n'.encode(),
    "wrong_types": (
        b'[exports.a]\nsource = 1\nfstype = "NFS!"\noptions = "a b"\nread_only = "yes"\n'
    ),
    "missing_source": b"[exports.a]\nfstype = 'nfs'\n",
    "exports_scalar": b"exports = 5\n",
    "missing_shares": b'shares_file = "/nonexistent/fusemux/shares"\n',
    "bad_shares": b'shares_file = "shares"\n',  # a sibling file with bad lines, see below
    "duplicate_key": b"linger = 1\nlinger = 2\n",
    "syntax": b"[exports.a\nsource =\n",
    "bad_shares_fstype": b'shares_fstype = "NFS x"\n',
}
KNOWN_BUGS = {
    "huge_int_linger": (
        b"linger = 1" + b"0" * 400 + b"\n",
        "fixed: an integer beyond a float's range crashed `fusemux check` with a "
        "traceback (OverflowError in config._is_number)",
    ),
    "nul_shares_file": (
        b'shares_file = "/etc/a\\u0000b"\n',
        "fixed: a NUL in shares_file crashed `fusemux check` with a traceback "
        "(ValueError: embedded null byte)",
    ),
}


def check_all(
    tmp_path: Path, configs: dict[str, bytes]
) -> dict[str, tuple[Path, Path, subprocess.Popen[str]]]:
    """Run ``fusemux check`` on every config at once (each in its own directory)."""
    procs = {}
    for name, data in configs.items():
        where = tmp_path / name
        where.mkdir()
        (where / "shares").write_text("host-without-export\nhost:/a -x\nhost:/b\nhost:/b\n")
        path = where / "fusemux.toml"
        path.write_bytes(data)
        proc = subprocess.Popen(
            [sys.executable, "-m", "fusemux", "check", "--config", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="backslashreplace",
        )
        procs[name] = (path, where / "shares", proc)
    return procs


def assert_clean_refusal(config: Path, shares: Path, proc: subprocess.Popen[str]) -> None:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, (config, proc.returncode, err)
    assert "Traceback" not in err, err
    assert out == "", out
    lines = err.splitlines()
    assert lines, "no problem reported"
    pattern = re.compile(rf"({re.escape(str(config))}|{re.escape(str(shares))}):\d+: \S.*")
    for line in lines:
        assert pattern.fullmatch(line), f"not FILE:LINE: reason: {line!r}"


def test_check_refuses_malformed_configs_cleanly(tmp_path: Path) -> None:
    procs = check_all(tmp_path, BAD_CONFIGS)
    for path, shares, proc in procs.values():
        assert_clean_refusal(path, shares, proc)
    assert len(procs) >= 20


@pytest.mark.parametrize(
    "name",
    [pytest.param(name, id=name) for name in KNOWN_BUGS],
)
def test_check_known_crashes(tmp_path: Path, name: str) -> None:
    data, _ = KNOWN_BUGS[name]
    [(path, shares, proc)] = check_all(tmp_path, {name: data}).values()
    assert_clean_refusal(path, shares, proc)
