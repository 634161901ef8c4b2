"""Tier (a): GPT and MBR parsing (fusemux.core.partitions) against tables sfdisk writes.

sfdisk (util-linux) is the reference: it writes the tables into image files, and the parser
must find the same partitions sfdisk reports. Corrupt tables (bad CRCs, loops in the EBR
chain, random bytes) must give a sane answer and never raise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusemux.core.partitions import SECTOR, Partition, parse, parse_file

pytestmark = pytest.mark.skipif(shutil.which("sfdisk") is None, reason="sfdisk is not installed")


def make_disk(path: Path, size_mib: int, script: str) -> None:
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    subprocess.run(["sfdisk", "-q", str(path)], input=script, text=True, check=True)


def sfdisk_view(path: Path) -> list[Partition]:
    """The partitions as sfdisk reports them (number from the node name's suffix)."""
    out = subprocess.run(["sfdisk", "-J", str(path)], capture_output=True, text=True, check=True)
    parts = json.loads(out.stdout)["partitiontable"].get("partitions", [])
    return [
        Partition(int(p["node"].rsplit(str(path), 1)[1]), p["start"] * SECTOR, p["size"] * SECTOR)
        for p in parts
    ]


def test_gpt(tmp_path: Path) -> None:
    disk = tmp_path / "gpt.raw"
    make_disk(disk, 64, "label: gpt\nstart=2048, size=40960, type=L\nsize=10240, type=S\n")
    parts = parse_file(str(disk))
    assert parts == sfdisk_view(disk)
    assert parts == [Partition(1, 1 << 20, 20 << 20), Partition(2, 21 << 20, 5 << 20)]


def test_gpt_with_a_gap_in_the_numbers(tmp_path: Path) -> None:
    disk = tmp_path / "gap.raw"
    make_disk(disk, 16, "label: gpt\n1: start=2048, size=2048\n3: start=8192, size=2048\n")
    assert [p.number for p in parse_file(str(disk))] == [1, 3]


def test_gpt_primary_corrupt_uses_backup(tmp_path: Path) -> None:
    disk = tmp_path / "gpt.raw"
    make_disk(disk, 16, "label: gpt\nstart=2048, size=8192\n")
    expected = parse_file(str(disk))
    with open(disk, "r+b") as f:
        f.seek(SECTOR + 56)  # the disk GUID of the primary header: breaks its CRC
        f.write(b"\xff" * 8)
    assert parse_file(str(disk)) == expected
    with open(disk, "r+b") as f:
        f.seek((16 << 20) - SECTOR + 56)  # now the backup too
        f.write(b"\xff" * 8)
    assert parse_file(str(disk)) == []


def test_mbr_with_logical_partitions(tmp_path: Path) -> None:
    disk = tmp_path / "mbr.raw"
    script = (
        "label: dos\n"
        "start=2048, size=4096, type=83\n"
        "start=8192, size=20480, type=5\n"
        "start=10240, size=4096, type=83\n"
        "start=16384, size=4096, type=83\n"
    )
    make_disk(disk, 32, script)
    parts = parse_file(str(disk))
    assert [p.number for p in parts] == [1, 5, 6]
    # sfdisk also lists the extended container (2), which carries no data.
    assert parts == [p for p in sfdisk_view(disk) if p.number != 2]


def test_mbr_ebr_loop_ends(tmp_path: Path) -> None:
    disk = tmp_path / "loop.raw"
    script = "label: dos\nstart=2048, size=20480, type=5\nstart=4096, size=2048, type=83\n"
    make_disk(disk, 16, script)
    data = bytearray(disk.read_bytes())
    ebr = 2048 * SECTOR
    # The EBR's link slot points at a next EBR 2048 sectors on, and that sector (zeros, no
    # signature) ends the chain; then make the link point back at the first EBR instead.
    data[ebr + 446 + 16 + 4] = 0x05
    data[ebr + 446 + 16 + 8 : ebr + 446 + 16 + 12] = (2048).to_bytes(4, "little")
    data[ebr + 446 + 16 + 12 : ebr + 446 + 16 + 16] = (2048).to_bytes(4, "little")
    nxt = (2048 + 2048) * SECTOR
    data[nxt : nxt + SECTOR] = data[ebr : ebr + SECTOR]  # a copy whose link points at itself
    data[nxt + 446 + 16 + 8 : nxt + 446 + 16 + 12] = (2048).to_bytes(4, "little")
    disk.write_bytes(bytes(data))
    parts = parse_file(str(disk))
    assert [p.number for p in parts] == [5, 6]  # the second EBR is read once, then the loop ends


def test_no_table(tmp_path: Path) -> None:
    disk = tmp_path / "blank.raw"
    disk.write_bytes(b"\0" * (1 << 20))
    assert parse_file(str(disk)) == []
    assert parse(lambda off, n: b"", 0) == []


def test_partitions_past_the_end_are_dropped(tmp_path: Path) -> None:
    disk = tmp_path / "short.raw"
    make_disk(disk, 16, "label: dos\nstart=2048, size=4096\nstart=8192, size=4096\n")
    with open(disk, "r+b") as f:
        f.truncate(10000 * SECTOR)  # the second partition now ends past the end
    assert [p.number for p in parse_file(str(disk))] == [1]


@settings(max_examples=300, deadline=None)
@given(
    blob=st.binary(min_size=0, max_size=4096),
    protective=st.booleans(),
    size=st.integers(min_value=0, max_value=1 << 40),
)
def test_fuzz_tables_never_raise(blob: bytes, protective: bool, size: int) -> None:
    data = bytearray(blob.ljust(4096, b"\0"))
    data[510:512] = b"\x55\xaa"
    if protective:
        data[446 + 4] = 0xEE
        data[SECTOR : SECTOR + 8] = b"EFI PART"

    def read(off: int, n: int) -> bytes:
        return bytes(data[off : off + n])

    for part in parse(read, size):
        assert part.start > 0 and part.length > 0 and part.start + part.length <= size
        assert part.number >= 1
