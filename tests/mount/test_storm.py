"""Tier (c): the concurrency storm (issue 3, part 1) as a CI test of about a minute.

This file owns only the CI parameters and the assertions; the storm (16 worker processes,
a canary holding one volume open, a mountinfo/xattr sampler, the read-back of every block
through fusemux and from the backing store) is :mod:`tests.stormlib`, shared with the
longer-running tool ``tests/bench/storm.py``. The ``daemon`` fixture adds its own checks at
teardown: exit 0, no mount left, no unexpected WARNING/ERROR lines in the daemon log.
"""

from __future__ import annotations

from tests.mount.harness import Daemon
from tests.stormlib import StormConfig, format_result, run_storm

DURATION = 60.0
WORKERS = 16
EXPORTS = 4


def test_storm_keeps_every_invariant(daemon: Daemon) -> None:
    cfg = StormConfig(duration=DURATION, workers=WORKERS, exports=EXPORTS, volumes_per_export=4)
    result = run_storm(daemon, cfg, say=print)
    report = format_result(result)
    print(report)
    assert result.ok, report
    # The figures the invariants rest on must be real, not vacuous.
    assert result.errors == 0 and result.canary_errors == 0, report
    assert result.canary_reads > 1000, report
    assert result.ops.get("open", 0) > 1000 and result.ops.get("write", 0) > 500, report
    assert result.sampler_snapshots > 1000 and result.sampler_xattr_samples > 50, report
    assert all(x["peak_mounts"] == 1 for x in result.exports), report
    # The canary's export stayed mounted all along; the idle-prone ones cycled.
    assert result.exports[0]["mount_count_storm"] == 1, report
    assert sum(x["mount_count_storm"] for x in result.exports[1:]) > 3 * (EXPORTS - 1), report
    assert all(x["holders_final"] == 0 for x in result.exports), report
    assert result.blocks_verified_fusemux > 0 and result.blocks_verified_backing > 0, report
    assert result.daemon_rc == 0 and not result.leaked_mounts, report
