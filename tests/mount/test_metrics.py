"""Tier (c): the Prometheus endpoint (config key ``metrics_listen``), scraped by a real
Prometheus server (Debian's ``prometheus``) and linted by ``promtool check metrics``; its bad
input: an address in use, an unparsable value, and a unix socket endpoint.

Prometheus runs as a child of the test on loopback, with a 1 s scrape interval and its
storage in the test's tmp dir; it is ended by PID in ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mount.harness import Daemon, mounted_at, run, wait_for

REPO = Path(__file__).resolve().parents[2]
VOL = b"metrics-test-volume\n" * 1000

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="Debian's prometheus package is not installed (scripts/setup.sh installs it)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        data: bytes = r.read()
        return data


def unix_get(path: Path, target: str = "/metrics") -> bytes:
    """One HTTP/1.0 GET over a unix socket; returns the whole response."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(f"GET {target} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


class Prometheus:
    """A Prometheus server scraping one target every second, on loopback."""

    def __init__(self, base: Path, target: str) -> None:
        self.port = free_port()
        self.base = base
        base.mkdir()
        config = base / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: fusemux\n"
            f"    static_configs: [{{targets: ['{target}']}}]\n"
        )
        with open(base / "prometheus.log", "wb") as log:
            self.proc = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={config}",
                    f"--storage.tsdb.path={base / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, (self.base / "prometheus.log").read_text()
            try:
                return http_get(self.url("/-/ready"), 2) != b""
            except OSError:
                return False

        wait_for(ready, 60, "prometheus to be ready")

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        url = self.url("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        data = json.loads(http_get(url))
        assert data["status"] == "success", data
        return [(r["metric"], float(r["value"][1])) for r in data["data"]["result"]]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return result[0][1] if len(result) == 1 else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@contextlib.contextmanager
def prometheus(base: Path, target: str) -> Iterator[Prometheus]:
    server = Prometheus(base, target)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_metrics_scraped_by_prometheus(daemon: Daemon, tmp_path: Path) -> None:
    """Known opens, mounts and a failed mount, seen through a real Prometheus scrape; the
    exposition passes ``promtool check metrics``."""
    port = free_port()
    daemon.add_bind_export("good", {"a": VOL, "b": VOL})
    daemon.exports["bad"] = {
        "source": str(tmp_path / "nowhere"),
        "fstype": "none",
        "options": "bind",
    }
    daemon.allowed_warnings.append(r"export bad: mount of .* failed")
    daemon.write_config(linger=0, metrics_listen=f"127.0.0.1:{port}")
    daemon.start()
    assert f"metrics at 127.0.0.1:{port}/metrics" in daemon.log()
    endpoint = f"http://127.0.0.1:{port}/metrics"
    with open(daemon.volume("good", "a"), "rb") as fa, open(daemon.volume("good", "b"), "rb") as fb:
        assert fa.read() == VOL and fb.read() == VOL
        with pytest.raises(OSError):
            open(daemon.volume("bad", "x"), "rb")
        text = http_get(endpoint)
        lint = subprocess.run(
            ["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60
        )
        assert lint.returncode == 0, lint.stdout + lint.stderr
        assert b'fusemux_export_open_volumes{export="good"} 2.0' in text
        with prometheus(tmp_path / "prometheus", f"127.0.0.1:{port}") as prom:

            def scraped() -> bool:
                return prom.value('fusemux_export_open_volumes{export="good"}') == 2

            wait_for(scraped, 60, "a scrape with both volumes open")
            for expr in (
                'fusemux_export_open_volumes{export="good"}',
                'fusemux_export_mounts_total{export="good"}',
                'fusemux_export_mount_failures_total{export="bad"}',
                'fusemux_requests_total{op="open"}',
                'fusemux_export_health{export="good",health="ok"}',
            ):
                print("prometheus:", expr, "=", prom.query(expr))
            assert prom.value('up{job="fusemux"}') == 1
            assert prom.value('fusemux_export_open_handles{export="good"}') == 2
            assert prom.value('fusemux_export_holders{export="good"}') == 2
            assert prom.value('fusemux_export_mounts_total{export="good"}') == 1
            assert prom.value('fusemux_export_state{export="good",state="mounted"}') == 1
            assert prom.value('fusemux_export_health{export="good",health="ok"}') == 1
            assert prom.value('fusemux_export_mounts_total{export="bad"}') == 0
            assert prom.value('fusemux_export_state{export="bad",state="failed"}') == 1
            failures = prom.query('fusemux_export_mount_failures_total{export="bad"}')
            assert len(failures) == 1 and failures[0][1] == 1, failures
            assert failures[0][0]["errno"].startswith("E"), failures
            assert (prom.value('sum(fusemux_requests_total{op="open"})') or 0) >= 2
            assert prom.value('fusemux_request_duration_seconds_count{op="open"}') == prom.value(
                'fusemux_requests_total{op="open"}'
            )
            assert (
                prom.value('fusemux_export_mount_duration_seconds_count{export="good",result="ok"}')
                == 1
            )
            assert (
                prom.value(
                    'fusemux_export_mount_duration_seconds_count{export="bad",result="failed"}'
                )
                == 1
            )
            assert prom.value("fusemux_mappings") is None  # two kinds: two series
            assert prom.value('fusemux_mappings{kind="loop"}') == 0
            assert prom.value(f'fusemux_info{{engine="{daemon.engine}"}}') == 1
            assert prom.value('fusemux_engine_events_total{event="OPEN"}') is not None
            assert (prom.value("fusemux_process_open_fds") or 0) > 0
    # After the last close: the export unmounts and a later scrape shows it.
    daemon.wait_unmounted("good")
    text = http_get(endpoint)
    assert b'fusemux_export_open_volumes{export="good"} 0.0' in text
    assert b'fusemux_export_state{export="good",state="unmounted"} 1.0' in text
    assert b'fusemux_export_mounts_total{export="good"} 1.0' in text


def test_metrics_on_a_unix_socket(daemon: Daemon, tmp_path: Path) -> None:
    """``metrics_listen`` as a socket path: served there, 404 elsewhere, removed at stop; a
    stale socket file left by a dead daemon is replaced."""
    sock_path = tmp_path / "metrics.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_path))  # bound, never listening: what a killed daemon leaves
    stale.close()
    daemon.add_bind_export("good", {"a": VOL})
    daemon.write_config(linger=0, metrics_listen=str(sock_path))
    daemon.start()
    reply = unix_get(sock_path)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    assert b"text/plain; version=0.0.4" in head
    assert b'fusemux_export_state{export="good",state="unmounted"} 1.0' in body
    assert unix_get(sock_path, "/other").startswith(b"HTTP/1.0 404")
    assert daemon.stop() == 0
    assert not sock_path.exists()


def test_metrics_listen_in_use_or_bad(daemon: Daemon, tmp_path: Path) -> None:
    """An address in use: serve exits 2 with the reason before mounting anything; an
    unparsable value: ``check`` and ``serve`` name the line and exit 2."""
    daemon.add_bind_export("good", {"a": VOL})
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        daemon.write_config(linger=0, metrics_listen=f"127.0.0.1:{port}")
        serve: list[str | Path] = [
            sys.executable,
            "-m",
            "fusemux",
            "serve",
            daemon.mnt,
            "--config",
            daemon.config_path,
        ]
        result = run(*serve, check=False, cwd=REPO)
        assert result.returncode == 2, result
        assert (
            f"metrics_listen 127.0.0.1:{port}: cannot listen: Address already in use"
            in result.stderr
        )
        assert "Traceback" not in result.stderr
        assert mounted_at(daemon.mnt) == [] and daemon.leftover_mounts() == []
    for bad, reason in (
        ("127.0.0.1", "expected HOST:PORT"),
        ("example.org:9477", "is not an IP address"),
        ("127.0.0.1:99999", "is not a number from 1 to 65535"),
        (9477, "must be a string"),
    ):
        daemon.write_config(linger=0, metrics_listen=bad)
        lines = daemon.config_path.read_text().splitlines()
        lineno = next(i for i, line in enumerate(lines, 1) if line.startswith("metrics_listen"))
        check: list[str | Path] = ["check", "--config", daemon.config_path]
        for argv in (check, serve[3:]):
            result = run(sys.executable, "-m", "fusemux", *argv, check=False, cwd=REPO)
            assert result.returncode == 2, result
            assert result.stderr.startswith(f"{daemon.config_path}:{lineno}: metrics_listen"), (
                result.stderr
            )
            assert reason in result.stderr, result.stderr
    assert mounted_at(daemon.mnt) == []


def test_every_series_is_named_fusemux(daemon: Daemon) -> None:
    """The contract: every metric name starts with fusemux_, and every per-export series
    carries the export label."""
    port = free_port()
    daemon.add_bind_export("good", {"a": VOL})
    daemon.write_config(linger=0, metrics_listen=f"127.0.0.1:{port}")
    daemon.start()
    with open(daemon.volume("good", "a"), "rb") as f:
        assert f.read() == VOL
        text = http_get(f"http://127.0.0.1:{port}/metrics").decode()
    names = {line.split("{")[0].split()[0] for line in text.splitlines() if line[:1] not in "#"}
    assert names and all(n.startswith("fusemux_") for n in names), sorted(names)
    for line in text.splitlines():
        if line.startswith("fusemux_export_"):
            assert 'export="good"' in line, line
