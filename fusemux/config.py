"""Configuration: the TOML file and Cinder's shares file, turned into a frozen :class:`Config`.

This module owns parsing and validation. It never raises on the first problem: it collects
every problem as ``FILE:LINE: reason`` and raises one :class:`ConfigError` holding them all, so
``fusemux check`` can show an operator everything that is wrong in one go.

TOML keys (unknown keys are errors)::

    state_dir = "/run/fusemux"
    linger = 10.0
    mount_timeout = 60.0
    engine = "auto"                          # "auto" | "pyfuse3" | "passthrough"
    kernel_passthrough = "auto"              # "auto" | "off" (own engine serves all I/O)
    shares_file = "/etc/cinder/nfs_shares"   # optional
    shares_fstype = "nfs"
    metrics_listen = "127.0.0.1:9477"        # optional: Prometheus endpoint (or a unix
                                             # socket path); unset means no endpoint
    log_format = "text"                      # "text" | "json"

    [exports.NAME]
    source = "host:/path"
    fstype = "nfs"
    options = "vers=4.2"
    read_only = false

A shares-file entry ``address:/export [-o options]`` becomes the export named
``md5(address).hexdigest()``, the directory name nova and os-brick use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = "/run/fusemux"
DEFAULT_LINGER = 10.0
DEFAULT_MOUNT_TIMEOUT = 60.0
DEFAULT_FSTYPE = "nfs"
# The FUSE engine: "passthrough" is fusemux's own /dev/fuse engine with kernel passthrough,
# "pyfuse3" the libfuse-based one; "auto" picks passthrough where the kernel offers it.
ENGINES = ("auto", "pyfuse3", "passthrough")
# Whether the own engine hands open files to the kernel (FUSE passthrough) where it can:
# "off" makes it serve every read and write itself, as on a kernel without passthrough.
KERNEL_PASSTHROUGH = ("auto", "off")

LOG_FORMATS = ("text", "json")
# sun_path is 108 bytes, NUL included.
UNIX_PATH_MAX = 107

TOP_KEYS = frozenset(
    {
        "state_dir",
        "linger",
        "mount_timeout",
        "io_timeout",
        "engine",
        "kernel_passthrough",
        "shares_file",
        "shares_fstype",
        "exports",
        "metrics_listen",
        "log_format",
    }
)
EXPORT_KEYS = frozenset({"source", "fstype", "options", "read_only", "io_timeout"})

# An export name is a directory name under /volumes: no slash, no leading dot, no control
# characters, and short enough for NAME_MAX.
# All three are used with fullmatch, so a trailing newline never slips through.
_EXPORT_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+@-]{0,254}")
_FSTYPE_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
# Cinder's own rule for a share address.
_SHARE_RE = re.compile(r"[^\x00]+:/[^\x00]+")


@dataclass(frozen=True)
class ExportConfig:
    """One export: a backing filesystem that mount(8) can mount."""

    name: str
    source: str
    fstype: str = DEFAULT_FSTYPE
    options: str = ""
    read_only: bool = False
    origin: str = ""  # FILE:LINE where it was defined, for messages
    # Seconds a backing-filesystem call may take before the caller gets ETIMEDOUT (the
    # call itself goes on); 0 = wait as long as it takes (a hard mount's semantics).
    io_timeout: float = 0.0

    def mount_options(self) -> str:
        """The ``-o`` argument for mount(8), with ``ro`` added for read-only exports."""
        opts = [o for o in self.options.split(",") if o]
        if self.read_only and "ro" not in opts:
            opts.append("ro")
        return ",".join(opts)


@dataclass(frozen=True)
class MetricsListen:
    """Where the Prometheus endpoint listens: TCP *host*:*port*, or a unix socket *path*."""

    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.path:
            return self.path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(value: str) -> MetricsListen:
    """``HOST:PORT`` (an IP literal, ``[v6]`` or ``localhost``) or an absolute socket path.

    Raises ValueError with the reason. No name is resolved: startup must not wait for DNS.
    """
    if value.startswith("/"):
        if "\0" in value or len(os.fsencode(value)) > UNIX_PATH_MAX:
            raise ValueError(f"a unix socket path must be at most {UNIX_PATH_MAX} bytes, no NUL")
        return MetricsListen(path=value)
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError("expected HOST:PORT such as '127.0.0.1:9477', or an absolute path")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("write an IPv6 address in brackets, such as '[::1]:9477'")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"host {host!r} is not an IP address (or localhost)") from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not a number from 1 to 65535")
    return MetricsListen(host=host, port=int(port_text))


@dataclass(frozen=True)
class Config:
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    linger: float = DEFAULT_LINGER
    mount_timeout: float = DEFAULT_MOUNT_TIMEOUT
    exports: Mapping[str, ExportConfig] = field(default_factory=dict)
    engine: str = "auto"
    kernel_passthrough: str = "auto"
    source_file: str = ""
    metrics_listen: MetricsListen | None = None
    log_format: str = "text"

    @property
    def mnt_dir(self) -> Path:
        return self.state_dir / "mnt"


class ConfigError(Exception):
    """Every problem found in a configuration, each formatted ``FILE:LINE: reason``."""

    def __init__(self, problems: list[str]) -> None:
        problems = sorted(problems, key=_file_line)  # stable: same-line problems keep order
        super().__init__("\n".join(problems))
        self.problems = problems


def _file_line(problem: str) -> tuple[str, int]:
    m = re.match(r"(.*?):(\d+): ", problem)
    return (m.group(1), int(m.group(2))) if m else (problem, 0)


def share_export_name(address: str) -> str:
    """The export name of a shares-file entry: the md5 nova and os-brick use."""
    return hashlib.md5(address.encode()).hexdigest()


class _Locator:
    """Finds the line of a table header or key in TOML text (tomllib keeps no positions)."""

    _HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
    _KEY = re.compile(r"^\s*(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_.-]+)\s*=")

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        # TOML ends lines at "\n" only; str.splitlines() would also split at "\f", U+2028...
        for lineno, line in enumerate(text.split("\n"), start=1):
            header = self._header(line)
            if header is not None:
                table = header
                self.lines.setdefault(table, lineno)
                continue
            m = self._KEY.match(line)
            if m:
                self.lines.setdefault(table + tuple(self._split(m.group(1))), lineno)

    @classmethod
    def _header(cls, line: str) -> tuple[str, ...] | None:
        """The key path of a ``[table]`` header line, with quoted/escaped names decoded."""
        stripped = line.strip()
        if not stripped.startswith("[") or stripped.startswith("[["):
            return None
        try:
            node: Any = tomllib.loads(stripped)  # a header line alone is a valid document
        except tomllib.TOMLDecodeError:
            m = cls._HEADER.match(line)
            return tuple(cls._split(m.group(1))) if m else None
        path: list[str] = []
        while isinstance(node, dict) and len(node) == 1:
            key = next(iter(node))
            path.append(key)
            node = node[key]
        return tuple(path) if path else None

    @staticmethod
    def _split(dotted: str) -> list[str]:
        parts = re.findall(r"\"[^\"]*\"|'[^']*'|[^.\s]+", dotted)
        return [p[1:-1] if p[:1] in "\"'" else p for p in parts]

    def line(self, *path: str) -> int:
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                return self.lines[path[:n]]
        return 1


def _is_number(v: Any) -> bool:
    """A finite int or float that fits a float (TOML integers are unbounded)."""
    if not isinstance(v, int | float) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _has_nul(v: Any) -> bool:
    return isinstance(v, str) and "\0" in v


def parse_shares(path: Path, fstype: str) -> tuple[list[ExportConfig], list[str]]:
    """Parse a Cinder shares file: one ``address:/export [-o options]`` per line.

    Raises OSError or UnicodeDecodeError when the file cannot be read at all.
    """
    exports: list[ExportConfig] = []
    problems: list[str] = []
    text = path.read_text(encoding="utf-8")
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.split("\n"), start=1):
        where = f"{path}:{lineno}"
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        address, _, rest = line.partition(" ")
        address = address.strip().replace("\\040", " ")
        if not _SHARE_RE.fullmatch(address) or "\0" in rest:
            problems.append(f"{where}: share {address!r} must be of the form address:/export")
            continue
        options: list[str] = []
        tokens = rest.split()
        ok = True
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            if tok == "-o" and i + 1 < len(tokens):
                options.append(tokens[i + 1])
                i += 2
            elif tok.startswith("-o") and len(tok) > 2:
                options.append(tok[2:])
                i += 1
            else:
                problems.append(
                    f"{where}: unsupported share option {tok!r}; only '-o OPTIONS' is accepted"
                )
                ok = False
                break
        if not ok:
            continue
        if address in seen:
            problems.append(f"{where}: share {address!r} already listed on line {seen[address]}")
            continue
        seen[address] = lineno
        exports.append(
            ExportConfig(
                name=share_export_name(address),
                source=address,
                fstype=fstype,
                options=",".join(options),
                origin=where,
            )
        )
    return exports, problems


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config (and the shares file it names); raise ConfigError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError([f"{path}:0: cannot read config: {e.strerror}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError([f"{path}:{line}: not valid UTF-8"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column \d+\)", str(e))
        if m:
            line = int(m.group(1))
        elif "end of document" in str(e):
            line = max(1, len(text.rstrip("\n").split("\n")))
        else:
            line = 1
        reason = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", str(e))
        raise ConfigError([f"{path}:{line}: TOML syntax error: {reason}"]) from None
    return _validate(path, text, data)


def _validate(path: Path, text: str, data: dict[str, Any]) -> Config:
    loc = _Locator(text)
    problems: list[str] = []

    def err(reason: str, *key: str) -> None:
        problems.append(f"{path}:{loc.line(*key)}: {reason}")

    for key in sorted(set(data) - TOP_KEYS):
        err(f"unknown key {key!r}", key)

    state_dir = data.get("state_dir", DEFAULT_STATE_DIR)
    if not isinstance(state_dir, str) or not state_dir.startswith("/") or _has_nul(state_dir):
        err("state_dir must be an absolute path string", "state_dir")
        state_dir = DEFAULT_STATE_DIR

    linger = data.get("linger", DEFAULT_LINGER)
    if not _is_number(linger) or linger < 0:
        err("linger must be a number of seconds >= 0", "linger")
        linger = DEFAULT_LINGER

    io_timeout = data.get("io_timeout", 0.0)
    if not _is_number(io_timeout) or io_timeout < 0:
        err("io_timeout must be a number of seconds >= 0 (0: no timeout)", "io_timeout")
        io_timeout = 0.0

    mount_timeout = data.get("mount_timeout", DEFAULT_MOUNT_TIMEOUT)
    if not _is_number(mount_timeout) or mount_timeout <= 0:
        err("mount_timeout must be a number of seconds > 0", "mount_timeout")
        mount_timeout = DEFAULT_MOUNT_TIMEOUT

    engine = data.get("engine", "auto")
    if engine not in ENGINES:
        err(f"engine must be one of {', '.join(map(repr, ENGINES))}", "engine")
        engine = "auto"

    kernel_passthrough = data.get("kernel_passthrough", "auto")
    if kernel_passthrough not in KERNEL_PASSTHROUGH:
        err(
            f"kernel_passthrough must be one of {', '.join(map(repr, KERNEL_PASSTHROUGH))}",
            "kernel_passthrough",
        )
        kernel_passthrough = "auto"

    metrics_listen: MetricsListen | None = None
    if "metrics_listen" in data:
        value = data["metrics_listen"]
        if not isinstance(value, str):
            err(
                "metrics_listen must be a string: HOST:PORT or a unix socket path", "metrics_listen"
            )
        else:
            try:
                metrics_listen = parse_listen(value)
            except ValueError as e:
                err(f"metrics_listen {value!r}: {e}", "metrics_listen")

    log_format = data.get("log_format", "text")
    if log_format not in LOG_FORMATS:
        err(f"log_format must be one of {', '.join(map(repr, LOG_FORMATS))}", "log_format")
        log_format = "text"

    shares_fstype = data.get("shares_fstype", DEFAULT_FSTYPE)
    if not isinstance(shares_fstype, str) or not _FSTYPE_RE.fullmatch(shares_fstype):
        err("shares_fstype must be a filesystem type name such as 'nfs'", "shares_fstype")
        shares_fstype = DEFAULT_FSTYPE

    exports: dict[str, ExportConfig] = {}
    table = data.get("exports", {})
    if not isinstance(table, dict):
        err("exports must be a table of [exports.NAME] tables", "exports")
        table = {}
    for name, spec in table.items():
        origin = f"{path}:{loc.line('exports', name)}"
        export = _validate_export(
            name, spec, origin, lambda r, *k, n=name: err(r, "exports", n, *k), float(io_timeout)
        )
        if export is not None:
            exports[name] = export

    shares_file = data.get("shares_file")
    if shares_file is not None:
        if not isinstance(shares_file, str) or not shares_file or _has_nul(shares_file):
            err("shares_file must be a path string without NUL", "shares_file")
        else:
            shares_path = Path(shares_file)
            if not shares_path.is_absolute():
                shares_path = path.parent / shares_path
            try:
                shares, share_problems = parse_shares(shares_path, shares_fstype)
            except OSError as e:
                err(f"cannot read shares file {shares_path}: {e.strerror}", "shares_file")
                shares, share_problems = [], []
            except UnicodeDecodeError:
                err(f"shares file {shares_path} is not valid UTF-8", "shares_file")
                shares, share_problems = [], []
            problems.extend(share_problems)
            for export in shares:
                if export.name in exports:
                    problems.append(
                        f"{export.origin}: share {export.source!r} has export name "
                        f"{export.name} which is already defined at {exports[export.name].origin}"
                    )
                    continue
                exports[export.name] = dataclasses.replace(export, io_timeout=float(io_timeout))

    if problems:
        raise ConfigError(problems)
    return Config(
        state_dir=Path(state_dir),
        linger=float(linger),
        mount_timeout=float(mount_timeout),
        exports=dict(sorted(exports.items())),
        source_file=str(path),
        engine=str(engine),
        kernel_passthrough=str(kernel_passthrough),
        metrics_listen=metrics_listen,
        log_format=str(log_format),
    )


def _validate_export(
    name: str, spec: Any, origin: str, err: Callable[..., None], default_io_timeout: float = 0.0
) -> ExportConfig | None:
    ok = True
    if not _EXPORT_NAME_RE.fullmatch(name):
        err(
            f"export name {name!r} is not a valid directory name "
            "(letters, digits, '_', '.', '+', '@', '-'; not starting with '.' or '-')"
        )
        ok = False
    if not isinstance(spec, dict):
        err(f"exports.{name} must be a table")
        return None
    for key in sorted(set(spec) - EXPORT_KEYS):
        err(f"unknown key {key!r} in exports.{name}", key)
        ok = False
    source = spec.get("source")
    if not isinstance(source, str) or not source.strip() or _has_nul(source):
        err(
            f"exports.{name}.source is required and must be a non-empty string without NUL",
            "source",
        )
        ok = False
    fstype = spec.get("fstype", DEFAULT_FSTYPE)
    if not isinstance(fstype, str) or not _FSTYPE_RE.fullmatch(fstype):
        err(f"exports.{name}.fstype must be a filesystem type name such as 'nfs'", "fstype")
        ok = False
    options = spec.get("options", "")
    if not isinstance(options, str) or any(c.isspace() or c == "\0" for c in options):
        err(f"exports.{name}.options must be a string without whitespace or NUL", "options")
        ok = False
    read_only = spec.get("read_only", False)
    if not isinstance(read_only, bool):
        err(f"exports.{name}.read_only must be true or false", "read_only")
        ok = False
    io_timeout = spec.get("io_timeout", default_io_timeout)
    if not _is_number(io_timeout) or io_timeout < 0:
        err(f"exports.{name}.io_timeout must be a number of seconds >= 0", "io_timeout")
        ok = False
    if not ok:
        return None
    assert isinstance(source, str) and isinstance(fstype, str) and isinstance(options, str)
    return ExportConfig(
        name=name,
        source=source,
        fstype=fstype,
        options=options,
        read_only=bool(read_only),
        origin=origin,
        io_timeout=float(io_timeout),
    )
