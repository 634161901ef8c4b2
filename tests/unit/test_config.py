"""Tier (a): the configuration contract of :mod:`fusemux.config` and ``fusemux check``.

Covers the TOML keys and their defaults, validation of every key (unknown keys, bad types,
bad export names), the ``FILE:LINE: reason`` format with exact line numbers, collecting all
problems at once, TOML syntax errors, Cinder's shares file (comments, ``\\040``, ``-o``,
md5 export names, bad lines, duplicates, unreadable file, relative path, collisions) and the
exit status and stderr of ``python -m fusemux check``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusemux.config import (
    DEFAULT_FSTYPE,
    DEFAULT_LINGER,
    DEFAULT_MOUNT_TIMEOUT,
    DEFAULT_STATE_DIR,
    Config,
    ConfigError,
    ExportConfig,
    MetricsListen,
    load_config,
    parse_shares,
    share_export_name,
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


# -- TOML: keys and defaults -------------------------------------------------------------


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    cfg_path = write(tmp_path / "f.toml", "")
    cfg = load_config(cfg_path)
    assert cfg.state_dir == Path(DEFAULT_STATE_DIR) == Path("/run/fusemux")
    assert cfg.linger == DEFAULT_LINGER == 10.0
    assert cfg.mount_timeout == DEFAULT_MOUNT_TIMEOUT == 60.0
    assert dict(cfg.exports) == {}
    assert cfg.source_file == str(cfg_path)
    assert cfg.mnt_dir == Path("/run/fusemux/mnt")
    assert cfg.engine == "auto"


@pytest.mark.parametrize("value", ["auto", "off"])
def test_kernel_passthrough_values(tmp_path: Path, value: str) -> None:
    cfg = load_config(write(tmp_path / "f.toml", f'kernel_passthrough = "{value}"\n'))
    assert cfg.kernel_passthrough == value
    assert load_config(write(tmp_path / "g.toml", "")).kernel_passthrough == "auto"


@pytest.mark.parametrize("engine", ["auto", "pyfuse3", "passthrough"])
def test_engine_values(tmp_path: Path, engine: str) -> None:
    assert load_config(write(tmp_path / "f.toml", f'engine = "{engine}"\n')).engine == engine


def test_full_config(tmp_path: Path) -> None:
    cfg_path = write(
        tmp_path / "f.toml",
        """\
state_dir = "/var/lib/fusemux"
linger = 2.5
mount_timeout = 30

[exports.zeta]
source = "nfs1:/srv/zeta"
fstype = "nfs4"
options = "vers=4.2,proto=tcp"
read_only = true

[exports.alpha]
source = "/dev/vdb"
fstype = "ext4"
""",
    )
    cfg = load_config(cfg_path)
    assert cfg.state_dir == Path("/var/lib/fusemux")
    assert cfg.mnt_dir == Path("/var/lib/fusemux/mnt")
    assert cfg.linger == 2.5
    assert cfg.mount_timeout == 30.0 and isinstance(cfg.mount_timeout, float)
    assert list(cfg.exports) == ["alpha", "zeta"]  # sorted by name
    assert cfg.exports["zeta"] == ExportConfig(
        name="zeta",
        source="nfs1:/srv/zeta",
        fstype="nfs4",
        options="vers=4.2,proto=tcp",
        read_only=True,
        origin=f"{cfg_path}:5",
    )
    alpha = cfg.exports["alpha"]
    assert (alpha.fstype, alpha.options, alpha.read_only) == ("ext4", "", False)
    assert alpha.origin == f"{cfg_path}:11"


def test_export_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "f.toml", '[exports.a]\nsource = "h:/a"\n'))
    export = cfg.exports["a"]
    assert export.fstype == DEFAULT_FSTYPE == "nfs"
    assert export.options == ""
    assert export.read_only is False


def test_linger_zero_and_integer_are_accepted(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "f.toml", "linger = 0\nmount_timeout = 1\n"))
    assert cfg.linger == 0.0 and isinstance(cfg.linger, float)
    assert cfg.mount_timeout == 1.0


@pytest.mark.parametrize(
    ("options", "read_only", "expected"),
    [
        ("", False, ""),
        ("", True, "ro"),
        ("vers=4.2,proto=tcp", False, "vers=4.2,proto=tcp"),
        ("vers=4.2", True, "vers=4.2,ro"),
        ("ro,vers=3", True, "ro,vers=3"),  # not added twice
        (",vers=3,,", False, "vers=3"),  # empty items dropped
    ],
)
def test_mount_options(options: str, read_only: bool, expected: str) -> None:
    export = ExportConfig(name="e", source="h:/e", options=options, read_only=read_only)
    assert export.mount_options() == expected


# -- TOML: validation, with exact FILE:LINE --------------------------------------------------


def test_unknown_top_level_key(tmp_path: Path) -> None:
    cfg_path = write(tmp_path / "f.toml", 'linger = 1\n\nlingr = 2\nstate_dir = "/x"\n')
    assert problems_of(cfg_path) == [f"{cfg_path}:3: unknown key 'lingr'"]


def test_unknown_export_key(tmp_path: Path) -> None:
    cfg_path = write(
        tmp_path / "f.toml",
        '[exports.a]\nsource = "h:/a"\n# comment\nreadonly = true\n',
    )
    assert problems_of(cfg_path) == [f"{cfg_path}:4: unknown key 'readonly' in exports.a"]


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("linger = true\n", 1, "linger must be a number of seconds >= 0"),
        ("\nlinger = -1\n", 2, "linger must be a number of seconds >= 0"),
        ('linger = "10"\n', 1, "linger must be a number of seconds >= 0"),
        ("linger = inf\n", 1, "linger must be a number of seconds >= 0"),
        ("linger = nan\n", 1, "linger must be a number of seconds >= 0"),
        ("mount_timeout = 0\n", 1, "mount_timeout must be a number of seconds > 0"),
        ("linger = 1\nmount_timeout = -3.5\n", 2, "mount_timeout must be a number of seconds > 0"),
        ("mount_timeout = false\n", 1, "mount_timeout must be a number of seconds > 0"),
        ('state_dir = "run/fusemux"\n', 1, "state_dir must be an absolute path string"),
        ("state_dir = 7\n", 1, "state_dir must be an absolute path string"),
        ('shares_fstype = "NFS"\n', 1, "shares_fstype must be a filesystem type name"),
        ('shares_file = ""\n', 1, "shares_file must be a path string"),
        ("exports = 3\n", 1, "exports must be a table of [exports.NAME] tables"),
        ('\nengine = "fuse"\n', 2, "engine must be one of 'auto', 'pyfuse3', 'passthrough'"),
        ("engine = 1\n", 1, "engine must be one of"),
        ('kernel_passthrough = "on"\n', 1, "kernel_passthrough must be one of 'auto', 'off'"),
        ("kernel_passthrough = false\n", 1, "kernel_passthrough must be one of"),
    ],
)
def test_bad_top_level_values(tmp_path: Path, text: str, line: int, reason: str) -> None:
    cfg_path = write(tmp_path / "f.toml", text)
    problems = problems_of(cfg_path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{cfg_path}:{line}: {reason}"), problems


@pytest.mark.parametrize(
    ("body", "line", "reason"),
    [
        ("fstype = 'nfs'\n", 2, "exports.e.source is required and must be a non-empty string"),
        ("source = ''\n", 3, "exports.e.source is required and must be a non-empty string"),
        ("source = 5\n", 3, "exports.e.source is required and must be a non-empty string"),
        ("source = 'h:/e'\nfstype = 'NFS!'\n", 4, "exports.e.fstype must be a filesystem type"),
        ("source = 'h:/e'\noptions = 'vers=4 ro'\n", 4, "exports.e.options must be a string"),
        ("source = 'h:/e'\noptions = ['ro']\n", 4, "exports.e.options must be a string"),
        ("source = 'h:/e'\nread_only = 'yes'\n", 4, "exports.e.read_only must be true or false"),
    ],
)
def test_bad_export_values(tmp_path: Path, body: str, line: int, reason: str) -> None:
    # Line 1 is a comment, line 2 the table header, the body starts on line 3.
    cfg_path = write(tmp_path / "f.toml", "# exports\n[exports.e]\n" + body)
    problems = problems_of(cfg_path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{cfg_path}:{line}: {reason}"), problems


@pytest.mark.parametrize("name", [".x", "a/b", "-x", "+x", "@x", "", "a b", "é", "a:b", "x" * 256])
def test_bad_export_names(tmp_path: Path, name: str) -> None:
    cfg_path = write(tmp_path / "f.toml", f'linger = 1\n\n[exports."{name}"]\nsource = "h:/x"\n')
    problems = problems_of(cfg_path)
    assert problems == [
        f"{cfg_path}:3: export name {name!r} is not a valid directory name "
        "(letters, digits, '_', '.', '+', '@', '-'; not starting with '.' or '-')"
    ]


@pytest.mark.parametrize("name", ["a", "vol_1", "x.y+z@w-1", "_", "9", "x" * 255])
def test_good_export_names(tmp_path: Path, name: str) -> None:
    cfg = load_config(write(tmp_path / "f.toml", f'[exports."{name}"]\nsource = "h:/x"\n'))
    assert list(cfg.exports) == [name]


def test_export_name_with_trailing_newline_is_rejected(tmp_path: Path) -> None:
    cfg_path = write(tmp_path / "f.toml", '[exports."ok\\n"]\nsource = "h:/x"\n')
    problems = problems_of(cfg_path)
    assert problems and "is not a valid directory name" in problems[0]


def test_export_that_is_not_a_table(tmp_path: Path) -> None:
    cfg_path = write(tmp_path / "f.toml", "[exports]\na = 3\n")
    assert problems_of(cfg_path) == [f"{cfg_path}:2: exports.a must be a table"]


def test_all_problems_are_collected_at_once(tmp_path: Path) -> None:
    cfg_path = write(
        tmp_path / "f.toml",
        """\
state_dir = "relative"
linger = true
mount_timeout = 0
colour = "blue"

[exports.good]
source = "h:/good"

[exports.bad]
fstype = "nfs"
optoins = "ro"

[exports.".hidden"]
source = "h:/hidden"
read_only = 1
""",
    )
    # Reported in line order.
    assert problems_of(cfg_path) == [
        f"{cfg_path}:1: state_dir must be an absolute path string",
        f"{cfg_path}:2: linger must be a number of seconds >= 0",
        f"{cfg_path}:3: mount_timeout must be a number of seconds > 0",
        f"{cfg_path}:4: unknown key 'colour'",
        f"{cfg_path}:9: exports.bad.source is required and must be a non-empty string without NUL",
        f"{cfg_path}:11: unknown key 'optoins' in exports.bad",
        f"{cfg_path}:13: export name '.hidden' is not a valid directory name "
        "(letters, digits, '_', '.', '+', '@', '-'; not starting with '.' or '-')",
        f"{cfg_path}:15: exports..hidden.read_only must be true or false",
    ]


def test_toml_syntax_error_names_its_line(tmp_path: Path) -> None:
    cfg_path = write(
        tmp_path / "f.toml", 'linger = 1\n\n[exports.a]\nsource = "h:/a\nfstype = "nfs"\n'
    )
    problems = problems_of(cfg_path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{cfg_path}:4: TOML syntax error: ")
    assert "(at line" not in problems[0]


def test_toml_syntax_error_on_a_later_line(tmp_path: Path) -> None:
    cfg_path = write(tmp_path / "f.toml", "linger = 1\nmount_timeout = 2\nstate_dir = = 3\n")
    (problem,) = problems_of(cfg_path)
    assert problem.startswith(f"{cfg_path}:3: TOML syntax error: ")


def test_toml_syntax_error_at_end_of_file_names_the_last_line(tmp_path: Path) -> None:
    cfg_path = write(tmp_path / "f.toml", 'linger = 1\nstate_dir = "/x"\nmount_timeout =')
    (problem,) = problems_of(cfg_path)
    assert problem.startswith(f"{cfg_path}:3: TOML syntax error: ")


def test_unreadable_config(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert problems_of(missing) == [f"{missing}:0: cannot read config: No such file or directory"]


def test_config_that_is_not_utf8(tmp_path: Path) -> None:
    cfg_path = tmp_path / "f.toml"
    cfg_path.write_bytes(b"linger = 1\n# caf\xe9\n")
    assert problems_of(cfg_path) == [f"{cfg_path}:2: not valid UTF-8"]


# -- Cinder shares file ----------------------------------------------------------------------


def test_share_export_name_is_md5_of_the_address() -> None:
    assert share_export_name("nfs1:/srv/a") == md5("nfs1:/srv/a")
    assert len(share_export_name("x:/y")) == 32


def test_shares_file(tmp_path: Path) -> None:
    shares = write(
        tmp_path / "nfs_shares",
        """\
# Cinder NFS shares
nfs1:/srv/cinder -o vers=4.2

  nfs2:/srv/with\\040space -o vers=3 -o proto=tcp
   # indented comment
nfs3:/srv/c -onolock
""",
    )
    cfg_path = write(
        tmp_path / "f.toml",
        f'linger = 1\nshares_file = "{shares}"\nshares_fstype = "nfs4"\n',
    )
    cfg = load_config(cfg_path)
    by_source = {e.source: e for e in cfg.exports.values()}
    assert set(by_source) == {"nfs1:/srv/cinder", "nfs2:/srv/with space", "nfs3:/srv/c"}
    one = by_source["nfs1:/srv/cinder"]
    assert one.name == md5("nfs1:/srv/cinder")
    assert (one.fstype, one.options, one.read_only) == ("nfs4", "vers=4.2", False)
    assert one.origin == f"{shares}:2"
    two = by_source["nfs2:/srv/with space"]
    assert two.name == md5("nfs2:/srv/with space")  # md5 after the \040 replacement
    assert two.options == "vers=3,proto=tcp"
    assert two.origin == f"{shares}:4"
    three = by_source["nfs3:/srv/c"]
    assert three.options == "nolock"
    assert three.mount_options() == "nolock"
    assert list(cfg.exports) == sorted(cfg.exports)


def test_shares_fstype_defaults_to_nfs(tmp_path: Path) -> None:
    shares = write(tmp_path / "shares", "h:/a\n")
    cfg = load_config(write(tmp_path / "f.toml", f'shares_file = "{shares}"\n'))
    assert cfg.exports[md5("h:/a")].fstype == "nfs"


def test_parse_shares_directly(tmp_path: Path) -> None:
    shares = write(tmp_path / "shares", "h:/a -o ro\nbad\n")
    exports, problems = parse_shares(shares, "nfs")
    assert [(e.name, e.source, e.options, e.fstype) for e in exports] == [
        (md5("h:/a"), "h:/a", "ro", "nfs")
    ]
    assert problems == [f"{shares}:2: share 'bad' must be of the form address:/export"]


def test_shares_file_bad_lines(tmp_path: Path) -> None:
    shares = write(
        tmp_path / "shares",
        """\
good:/a
host-without-path
# fine
host:relative
good:/b -t nfs
good:/c -o
good:/a -o vers=3
good:/d
""",
    )
    cfg_path = write(tmp_path / "f.toml", f'shares_file = "{shares}"\n')
    assert problems_of(cfg_path) == [
        f"{shares}:2: share 'host-without-path' must be of the form address:/export",
        f"{shares}:4: share 'host:relative' must be of the form address:/export",
        f"{shares}:5: unsupported share option '-t'; only '-o OPTIONS' is accepted",
        f"{shares}:6: unsupported share option '-o'; only '-o OPTIONS' is accepted",
        f"{shares}:7: share 'good:/a' already listed on line 1",
    ]


def test_unreadable_shares_file_is_reported_on_the_shares_file_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing_shares"
    cfg_path = write(
        tmp_path / "f.toml",
        f'linger = 1\n# where Cinder keeps its shares\nshares_file = "{missing}"\n',
    )
    assert problems_of(cfg_path) == [
        f"{cfg_path}:3: cannot read shares file {missing}: No such file or directory"
    ]


def test_shares_file_that_is_a_directory(tmp_path: Path) -> None:
    cfg_path = write(tmp_path / "f.toml", f'shares_file = "{tmp_path}"\n')
    (problem,) = problems_of(cfg_path)
    assert problem.startswith(f"{cfg_path}:1: cannot read shares file {tmp_path}: ")


def test_shares_file_not_utf8(tmp_path: Path) -> None:
    shares = tmp_path / "shares"
    shares.write_bytes(b"h:/caf\xe9\n")
    cfg_path = write(tmp_path / "f.toml", f'\nshares_file = "{shares}"\n')
    assert problems_of(cfg_path) == [f"{cfg_path}:2: shares file {shares} is not valid UTF-8"]


def test_relative_shares_file_is_resolved_against_the_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    write(conf_dir / "nfs_shares", "h:/a\n")
    cfg_path = write(conf_dir / "f.toml", 'shares_file = "nfs_shares"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write(elsewhere / "nfs_shares", "wrong:/one\n")  # must not be picked up from the cwd
    monkeypatch.chdir(elsewhere)
    cfg = load_config(cfg_path)
    assert [e.source for e in cfg.exports.values()] == ["h:/a"]
    assert cfg.exports[md5("h:/a")].origin == f"{conf_dir / 'nfs_shares'}:1"


def test_shares_name_colliding_with_an_export_table(tmp_path: Path) -> None:
    shares = write(tmp_path / "shares", "# shares\nh:/a\nh:/b\n")
    name = md5("h:/a")
    cfg_path = write(
        tmp_path / "f.toml",
        f'shares_file = "{shares}"\n\n[exports.{name}]\nsource = "other:/x"\n',
    )
    assert problems_of(cfg_path) == [
        f"{shares}:2: share 'h:/a' has export name {name} which is already defined at {cfg_path}:3"
    ]


def test_shares_and_toml_problems_are_reported_together(tmp_path: Path) -> None:
    shares = write(tmp_path / "shares", "nopath\n")
    cfg_path = write(tmp_path / "f.toml", f'linger = -1\nshares_file = "{shares}"\n')
    assert problems_of(cfg_path) == [
        f"{cfg_path}:1: linger must be a number of seconds >= 0",
        f"{shares}:1: share 'nopath' must be of the form address:/export",
    ]


def test_shares_and_tables_combine(tmp_path: Path) -> None:
    shares = write(tmp_path / "shares", "h:/a\n")
    cfg = load_config(
        write(
            tmp_path / "f.toml",
            f'shares_file = "{shares}"\n[exports.local]\nsource = "/dev/vdb"\nfstype = "xfs"\n',
        )
    )
    assert set(cfg.exports) == {"local", md5("h:/a")}
    assert isinstance(cfg, Config)


# -- the CLI -----------------------------------------------------------------------------------


def run_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fusemux", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_cli_check_clean_file(tmp_path: Path) -> None:
    cfg_path = write(
        tmp_path / "f.toml",
        '[exports.a]\nsource = "h:/a"\noptions = "vers=4.2"\nread_only = true\n',
    )
    result = run_check(cfg_path)
    assert result.returncode == 0, result.stderr
    assert f"{cfg_path}: OK, 1 export(s)" in result.stdout
    assert "a: mount -t nfs -o vers=4.2,ro h:/a" in result.stdout
    assert result.stderr == ""


def test_cli_check_bad_file(tmp_path: Path) -> None:
    cfg_path = write(tmp_path / "f.toml", 'linger = -1\n[exports.a]\nsourc = "h:/a"\n')
    result = run_check(cfg_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"{cfg_path}:1: linger must be a number of seconds >= 0",
        f"{cfg_path}:2: exports.a.source is required and must be a non-empty string without NUL",
        f"{cfg_path}:3: unknown key 'sourc' in exports.a",
    ]
    assert result.stdout == ""


def test_cli_check_syntax_error_and_missing_file(tmp_path: Path) -> None:
    cfg_path = write(tmp_path / "f.toml", "linger = 1\nlinger = 2\n")
    result = run_check(cfg_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"{cfg_path}:2: TOML syntax error: ")
    assert "Traceback" not in result.stderr
    result = run_check(tmp_path / "missing.toml")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"{tmp_path / 'missing.toml'}:0: cannot read config")


# -- metrics_listen and log_format (issue 14) ------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"127.0.0.1:9477"', MetricsListen(host="127.0.0.1", port=9477)),
        ('"localhost:1"', MetricsListen(host="127.0.0.1", port=1)),
        ('"[::1]:65535"', MetricsListen(host="::1", port=65535)),
        ('"0.0.0.0:9477"', MetricsListen(host="0.0.0.0", port=9477)),
        ('"/run/fusemux/metrics.sock"', MetricsListen(path="/run/fusemux/metrics.sock")),
    ],
)
def test_metrics_listen_values(tmp_path: Path, value: str, expected: MetricsListen) -> None:
    config = load_config(write(tmp_path / "c.toml", f"linger = 1\nmetrics_listen = {value}\n"))
    assert config.metrics_listen == expected
    assert str(expected) == value.strip('"').replace("localhost", "127.0.0.1")


def test_metrics_listen_unset_means_off(tmp_path: Path) -> None:
    assert load_config(write(tmp_path / "c.toml", "")).metrics_listen is None


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ('"127.0.0.1"', "expected HOST:PORT"),
        ('""', "expected HOST:PORT"),
        ('":9477"', "expected HOST:PORT"),
        ('"example.org:9477"', "'example.org' is not an IP address"),
        ('"127.0.0.1:0"', "port '0' is not a number from 1 to 65535"),
        ('"127.0.0.1:65536"', "port '65536' is not a number from 1 to 65535"),
        ('"127.0.0.1:http"', "port 'http' is not a number"),
        ('"::1:9477"', "IPv6 address in brackets"),
        ('"relative/metrics.sock"', "expected HOST:PORT"),
        ('"/' + "x" * 120 + '"', "at most 107 bytes"),
        ("9477", "metrics_listen must be a string"),
        ("true", "metrics_listen must be a string"),
    ],
)
def test_metrics_listen_problems_name_the_line(tmp_path: Path, value: str, reason: str) -> None:
    path = write(tmp_path / "c.toml", f"linger = 1\n\nmetrics_listen = {value}\n")
    problems = problems_of(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:3: metrics_listen"), problems
    assert reason in problems[0], problems


def test_log_format(tmp_path: Path) -> None:
    assert load_config(write(tmp_path / "a.toml", "")).log_format == "text"
    assert load_config(write(tmp_path / "b.toml", 'log_format = "json"\n')).log_format == "json"
    path = write(tmp_path / "c.toml", 'linger = 1\nlog_format = "yaml"\n')
    assert problems_of(path) == [f"{path}:2: log_format must be one of 'text', 'json'"]


def test_check_names_the_metrics_listen_line(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", 'linger = 1\nmetrics_listen = "127.0.0.1:x"\n')
    result = subprocess.run(
        [sys.executable, "-m", "fusemux", "check", "--config", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"{path}:2: metrics_listen '127.0.0.1:x': port 'x' is not a number from 1 to 65535\n"
    )
