"""Tier (a): inode numbers and volume-name rules of :mod:`fusemux.core.namespace`.

Covers the fixed inodes of the root and ``/volumes``, export and volume inodes (stable,
distinct, the same in a second Namespace built from the same names), collision probing,
``visible_volume_name`` and NotFound for unknown inodes and exports.
"""

from __future__ import annotations

import errno
from types import SimpleNamespace

import pytest

from fusemux.core import namespace as ns
from fusemux.core.namespace import (
    NAME_MAX,
    ROOT_INO,
    VOLUMES_INO,
    Kind,
    Namespace,
    Node,
    visible_volume_name,
)
from fusemux.errors import NotFound, errno_of

EXPORTS = ["alpha", "beta", "gamma"]


def test_fixed_inodes() -> None:
    space = Namespace(EXPORTS)
    assert ROOT_INO == 1 and VOLUMES_INO == 2
    assert space.node(1) == Node(1, Kind.ROOT)
    assert space.node(2) == Node(2, Kind.VOLUMES)
    assert space.node(1).is_dir and space.node(2).is_dir


def test_export_inodes_are_distinct_and_stable() -> None:
    space = Namespace(EXPORTS)
    inos = {name: space.export_node(name).ino for name in EXPORTS}
    assert len(set(inos.values())) == len(EXPORTS)
    assert all(ino >= 1 << 10 for ino in inos.values())  # clear of the fixed inodes
    for name, ino in inos.items():
        node = space.node(ino)
        assert node == Node(ino, Kind.EXPORT, export=name)
        assert node.is_dir
        assert space.export_node(name) is node
    assert [n.ino for n in space.export_nodes()] == sorted(inos.values())
    assert {n.export for n in space.export_nodes()} == set(EXPORTS)
    # The order of the names does not change the numbers.
    assert {n: Namespace(list(reversed(EXPORTS))).export_node(n).ino for n in EXPORTS} == inos


def test_volume_inodes_are_stable_within_and_across_instances() -> None:
    first, second = Namespace(EXPORTS), Namespace(EXPORTS)
    names = [("alpha", "volume-1"), ("alpha", "volume-2"), ("beta", "volume-1")]
    inos = [first.volume_node(e, n).ino for e, n in names]
    assert len(set(inos)) == len(inos)
    assert [first.volume_node(e, n).ino for e, n in names] == inos  # same life
    # A restarted daemon (a new Namespace) gives the same numbers, in any order.
    assert [second.volume_node(e, n).ino for e, n in reversed(names)] == list(reversed(inos))
    node = first.node(inos[0])
    assert node == Node(inos[0], Kind.VOLUME, export="alpha", name="volume-1")
    assert not node.is_dir
    assert first.volume_node("alpha", "volume-1") is node


def test_volume_inodes_differ_from_export_inodes() -> None:
    space = Namespace(EXPORTS)
    others = {space.volume_node(e, "disk").ino for e in EXPORTS}
    assert len(others) == 3
    assert not others & {n.ino for n in space.export_nodes()}


def test_collision_is_probed_to_the_next_free_inode(monkeypatch: pytest.MonkeyPatch) -> None:
    space = Namespace(EXPORTS)
    # Find where ("alpha", "disk") would land, then occupy that number with another node.
    natural = Namespace(EXPORTS).volume_node("alpha", "disk").ino
    squatter = Node(natural, Kind.VOLUME, export="beta", name="squatter")
    space._by_ino[natural] = squatter
    space._by_ino[natural + 1] = Node(natural + 1, Kind.VOLUME, export="beta", name="squat2")
    node = space.volume_node("alpha", "disk")
    assert node.ino == natural + 2
    assert space.node(natural) is squatter  # the earlier owner keeps its number
    assert space.volume_node("alpha", "disk") is node  # and the probed number is remembered


def test_two_names_with_the_same_hash_get_different_inodes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class ConstantHash:
        def __init__(self, data: bytes) -> None:
            pass

        def digest(self) -> bytes:
            return (5000).to_bytes(8, "little")

    monkeypatch.setattr(ns, "hashlib", SimpleNamespace(blake2b=ConstantHash))
    space = Namespace(["e"])
    assert space.export_node("e").ino == 5000
    a = space.volume_node("e", "a")
    b = space.volume_node("e", "b")
    assert (a.ino, b.ino) == (5001, 5002)
    assert space.node(5001).name == "a" and space.node(5002).name == "b"
    assert space.volume_node("e", "a").ino == 5001


def test_small_hashes_are_lifted_above_the_fixed_range(monkeypatch: pytest.MonkeyPatch) -> None:
    class TinyHash:
        def __init__(self, data: bytes) -> None:
            pass

        def digest(self) -> bytes:
            return (1).to_bytes(8, "little")

    monkeypatch.setattr(ns, "hashlib", SimpleNamespace(blake2b=TinyHash))
    space = Namespace(["e"])
    assert space.export_node("e").ino == 1 << 10
    assert space.node(ROOT_INO).kind is Kind.ROOT


@pytest.mark.parametrize(
    ("name", "visible"),
    [
        ("volume-1", True),
        ("volume-1.qcow2", True),
        ("with space", True),
        ("é", True),
        ("x" * NAME_MAX, True),
        ("é" * 127, True),  # 254 bytes
        ("", False),
        (".hidden", False),
        (".", False),
        ("..", False),
        ("a/b", False),
        ("a\0b", False),
        ("x" * (NAME_MAX + 1), False),
        ("é" * 128, False),  # 128 characters but 256 bytes
        ("bad\udcff" + "x" * 251, True),  # surrogate-escaped byte counts as one byte
        ("bad\udcff" + "x" * 252, False),
    ],
)
def test_visible_volume_name(name: str, visible: bool) -> None:
    assert visible_volume_name(name) is visible


def test_unknown_inode_and_export() -> None:
    space = Namespace(EXPORTS)
    with pytest.raises(NotFound) as info:
        space.node(3)
    assert errno_of(info.value) == errno.ENOENT
    with pytest.raises(NotFound):
        space.export_node("delta")
    vol = Namespace(EXPORTS).volume_node("alpha", "v")
    with pytest.raises(NotFound):
        space.node(vol.ino)  # not seen by this instance yet
