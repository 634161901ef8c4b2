"""Log output: one line per event, with ``key=value`` fields, as text or JSON.

This module owns the format of the daemon's log. Event lines carry their subject as
``logging`` extras (``extra={"export": ..., "volume": ..., "pid": ..., "comm": ...,
"errno": ..., "op": ...}``, see :func:`fields`); the formatters append them, so a message is
written once and read both by people and by log pipelines:

* ``text`` (default): ``TIME LEVEL LOGGER: message key=value ...``; values with spaces or
  quotes are quoted. The tier-(c) harness greps these lines for `` WARNING ``/`` ERROR ``.
* ``json`` (config ``log_format = "json"``): one object per line with ``time``, ``level``,
  ``logger``, ``message``, the fields, and ``exception`` (a traceback) if there is one.

Under systemd (``$JOURNAL_STREAM`` names our stderr) each line starts with the syslog
priority ``<N>`` so journald keeps the levels, and the text format leaves out the time
(journald stamps every line itself).

Concurrency: ``logging`` handlers lock around emit; the formatters keep no state.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

# The fields an event line may carry, in the order they are written.
FIELDS = ("export", "volume", "op", "pid", "comm", "errno")
# logging level -> syslog priority (sd-daemon(3) prefixes).
PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def fields(**values: object) -> dict[str, object]:
    """``extra=`` for an event line: the given fields, without those that are None."""
    return {k: v for k, v in values.items() if v is not None}


def errname(err: int) -> str:
    """``ENOENT`` for 2: the form of the ``errno=`` field."""
    return errno.errorcode.get(err, str(err))


def _priority(levelno: int) -> int:
    for level, prio in sorted(PRIORITY.items(), reverse=True):
        if levelno >= level:
            return prio
    return 7


def _quote(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\\\n\t'):
        return text
    return json.dumps(text, ensure_ascii=False)


def record_fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: record.__dict__[k] for k in FIELDS if record.__dict__.get(k) is not None}


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: message key=value ...`` (no time and a ``<N>`` prefix under
    journald)."""

    def __init__(self, journal: bool = False) -> None:
        fmt = "%(levelname)s %(name)s: %(message)s"
        super().__init__(fmt if journal else "%(asctime)s " + fmt)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = " ".join(f"{k}={_quote(v)}" for k, v in record_fields(record).items())
        if extra:
            first, nl, rest = text.partition("\n")  # after the message, before a traceback
            text = f"{first} {extra}{nl}{rest}"
        if self.journal:
            prio = _priority(record.levelno)
            text = "\n".join(f"<{prio}>{line}" for line in text.split("\n"))
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update(record_fields(record))
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        line = json.dumps(data, ensure_ascii=False, default=str)
        return f"<{_priority(record.levelno)}>{line}" if self.journal else line

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{base}.{int(record.msecs):03d}Z"


def under_journald(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Whether *stream* is the journal stream systemd set up (``$JOURNAL_STREAM`` = dev:ino)."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup(verbose: bool, fmt: str = "text", stream: TextIO | None = None) -> None:
    """(Re)configure the root logger: level, and the *fmt* formatter on *stream* (stderr)."""
    stream = stream or sys.stderr
    journal = under_journald(stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(journal) if fmt == "json" else TextFormatter(journal))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
