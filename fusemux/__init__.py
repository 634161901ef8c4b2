"""fusemux: one FUSE mount per hypervisor host that multiplexes volume exports.

This module owns only the package version; everything else lives in the submodules
listed in docs/design.md.
"""

__version__ = "0.1.0"
