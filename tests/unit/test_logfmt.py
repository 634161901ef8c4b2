"""Tier (a): the log formatters of :mod:`fusemux.logfmt`: ``key=value`` fields in text,
one JSON object per line, journald priority prefixes, and when journald is detected."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from pathlib import Path

import pytest

from fusemux import logfmt


def record(
    level: int = logging.INFO, msg: str = "export %s: mounted", **extra: object
) -> logging.LogRecord:
    rec = logging.LogRecord("fusemux.core.exports", level, __file__, 1, msg, ("gold",), None)
    rec.__dict__.update(extra)
    return rec


def test_text_appends_fields_in_a_fixed_order() -> None:
    fmt = logfmt.TextFormatter()
    line = fmt.format(
        record(comm="qemu-system-x86", pid=42, volume="vm 1.raw", export="gold", op="open")
    )
    assert line.endswith(
        ' INFO fusemux.core.exports: export gold: mounted export=gold volume="vm 1.raw" op=open '
        "pid=42 comm=qemu-system-x86"
    ), line
    # the harness's " WARNING " / " ERROR " grep still works
    assert " WARNING fusemux.core.exports: " in fmt.format(record(logging.WARNING))


def test_text_without_fields_is_the_old_format() -> None:
    line = logfmt.TextFormatter().format(record())
    assert line.split(" ", 2)[2] == "INFO fusemux.core.exports: export gold: mounted"


def test_text_quotes_values_that_need_it() -> None:
    line = logfmt.TextFormatter().format(record(volume='a"b', comm="x=y", errno="ENOENT"))
    assert line.endswith(' volume="a\\"b" comm="x=y" errno=ENOENT'), line


def test_fields_come_before_a_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record(logging.ERROR, "unexpected error in %s", op="read")
        rec.exc_info = sys.exc_info()
    lines = logfmt.TextFormatter().format(rec).split("\n")
    assert lines[0].endswith("unexpected error in gold op=read")
    assert lines[1] == "Traceback (most recent call last):"


def test_journal_text_has_priorities_and_no_time() -> None:
    fmt = logfmt.TextFormatter(journal=True)
    assert fmt.format(record(logging.WARNING, export="gold")) == (
        "<4>WARNING fusemux.core.exports: export gold: mounted export=gold"
    )
    assert fmt.format(record(logging.DEBUG)).startswith("<7>DEBUG ")
    assert fmt.format(record(logging.ERROR)).startswith("<3>ERROR ")
    assert fmt.format(record(logging.INFO)).startswith("<6>INFO ")
    assert fmt.format(record(logging.CRITICAL)).startswith("<2>CRITICAL ")


def test_json_is_one_object_per_line() -> None:
    try:
        raise OSError(5, "Input/output error")
    except OSError:
        rec = record(logging.ERROR, export="gold", errno="EIO", pid=7)
        rec.exc_info = sys.exc_info()
    line = logfmt.JsonFormatter().format(rec)
    assert "\n" not in line
    data = json.loads(line)
    assert data["level"] == "ERROR"
    assert data["logger"] == "fusemux.core.exports"
    assert data["message"] == "export gold: mounted"
    assert (data["export"], data["errno"], data["pid"]) == ("gold", "EIO", 7)
    assert "OSError" in data["exception"]
    assert data["time"].endswith("Z") and "T" in data["time"]
    assert "volume" not in data
    assert logfmt.JsonFormatter(journal=True).format(record(logging.WARNING)).startswith("<4>{")


def test_fields_drops_none_and_errname() -> None:
    assert logfmt.fields(export="gold", volume=None, pid=0) == {"export": "gold", "pid": 0}
    assert logfmt.errname(2) == "ENOENT"
    assert logfmt.errname(99999) == "99999"


def test_under_journald_compares_the_stream(tmp_path: Path) -> None:
    with open(tmp_path / "log", "w") as stream:
        st = os.fstat(stream.fileno())
        assert logfmt.under_journald(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not logfmt.under_journald(stream, {"JOURNAL_STREAM": f"{st.st_dev}:1"})
        assert not logfmt.under_journald(stream, {"JOURNAL_STREAM": "garbage"})
        assert not logfmt.under_journald(stream, {})
    assert not logfmt.under_journald(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_setup_replaces_the_root_handler(fmt: str) -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    stream = io.StringIO()
    try:
        logfmt.setup(False, fmt, stream)
        logfmt.setup(True, fmt, stream)  # again: still one handler
        assert len(root.handlers) == 1 and root.level == logging.DEBUG
        logging.getLogger("fusemux.test").debug("hello %s", "x", extra=logfmt.fields(op="t"))
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
    out = stream.getvalue().strip()
    if fmt == "json":
        assert json.loads(out)["op"] == "t"
    else:
        assert out.endswith("DEBUG fusemux.test: hello x op=t")
