"""Tier (c): one tiny run of the benchmark harness (``tests/bench``), to prove it still works.

It checks only that the harness runs end to end (all four systems, a fio workload of each
kind, the lifecycle benchmarks at toy sizes), cleans up after itself and writes its JSON and
markdown table. It asserts no performance figure: targets are for ``make bench``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.bench.systems import SYSTEMS

ROOT = Path(__file__).resolve().parents[2]


def test_bench_harness_smoke(tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        [
            sys.executable, "-m", "tests.bench.run", "--dir", str(work),
            "--reps", "1", "--runtime", "0.2", "--size-mib", "8", "--backings", "tmpfs",
            "--workloads", "seq read 1M O_DIRECT", "randwrite 4K O_DIRECT QD16",
            "--open-iterations", "50", "--first-open-reps", "1",
            "--storm-exports", "3", "--storm-per-export", "2", "--listing", "20",
            "--json", str(out_json), "--table", str(out_md),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out_json.read_text())
    cells = res["fio"]["tmpfs"]
    assert set(cells) == {"seq read 1M O_DIRECT", "randwrite 4K O_DIRECT QD16"}
    for cell in cells.values():
        assert set(SYSTEMS) <= set(cell)
        assert cell["native"]["median"] > 0
        assert cell["fusemux"]["median"] > 0 and cell["fusemux"]["ratios_to_native"]
        assert cell["fusemux"]["runs"][0]["cpu_s"] is not None
    assert set(res["open_close"]) == set(SYSTEMS)
    assert res["first_open"]["fusemux_mounts"] == 1
    assert res["storm"]["mounts"] == res["storm"]["exports"] == 3
    assert res["storm"]["open_ok"] == 6
    table = out_md.read_text()
    assert "| workload |" in table and "B fusemux" in table and table in proc.stdout
    assert list(work.iterdir()) == []  # the work directory was removed: nothing left mounted
