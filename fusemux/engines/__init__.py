"""FUSE engines: thin adapters that translate kernel requests into calls on the core.

This package owns the choice of engine (:func:`select`). Only its modules may import a FUSE
binding such as pyfuse3. Every engine drives the same engine-agnostic
:class:`fusemux.core.fs.FileSystem` and offers the same life cycle to the daemon
(:class:`Engine`): ``mount`` the session, ``serve`` until it ends, ``terminate`` it from a
signal handler task, ``close`` it (unmounting).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from fusemux.core.fs import FileSystem

log = logging.getLogger(__name__)


class Engine(Protocol):
    name: str

    def mount(self) -> None: ...

    async def serve(self) -> None: ...

    def terminate(self) -> None: ...

    def close(self, unmount: bool = True) -> None: ...


class EngineUnavailable(Exception):
    """The configured engine cannot run here (a clear reason, no traceback)."""


def select(wanted: str, workdir: Path) -> tuple[str, str]:
    """The engine to run for config value *wanted*, and why.

    ``auto`` picks ``passthrough`` when a probe mount shows that the kernel offers FUSE
    passthrough and this process may register backing files (root), else ``pyfuse3``.
    ``passthrough`` asked for explicitly runs even without kernel passthrough (it then
    serves reads and writes itself); it only needs /dev/fuse and the right to mount.
    """
    if wanted == "pyfuse3":
        return "pyfuse3", "configured"
    from fusemux.engines import kernel

    ok, why = kernel.probe(workdir)
    if wanted == "passthrough":
        return "passthrough", "configured" + ("" if ok else f"; without passthrough: {why}")
    if ok:
        return "passthrough", f"auto: {why}"
    return "pyfuse3", f"auto: {why}"


def create(
    name: str, fs: FileSystem, mountpoint: str, debug: bool = False, kernel_passthrough: bool = True
) -> Engine:
    """The engine *name* serving *fs* at *mountpoint*. *kernel_passthrough* False makes the
    own engine serve every read and write itself (config ``kernel_passthrough = "off"``)."""
    if name == "passthrough":
        from fusemux.engines import kernel

        return kernel.Session(fs, mountpoint, passthrough=kernel_passthrough, debug=debug)
    from fusemux.engines import pyfuse3

    return pyfuse3.Pyfuse3Engine(fs, mountpoint, debug)
