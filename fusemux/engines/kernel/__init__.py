"""fusemux's own FUSE engine (config ``engine = "passthrough"``): ``/dev/fuse`` spoken with
trio, kernel passthrough of open volumes where the kernel offers it. No libfuse, no pyfuse3.

The modules, one concern each:

* :mod:`~fusemux.engines.kernel.device`: ``/dev/fuse``, ``mount(2)``, INIT offer, the probe;
* :mod:`~fusemux.engines.kernel.session`: one connection: INIT, the request loop, replies,
  interrupts, lookup counts;
* :mod:`~fusemux.engines.kernel.ops`: the handlers, one core call per request;
* :mod:`~fusemux.engines.kernel.backing`: passthrough registrations of backing files;
* :mod:`~fusemux.engines.kernel.wire`: reply encoding.

The protocol's struct layouts are in :mod:`fusemux.engines.fuse_abi`. Concurrency: see each
module; everything but the core's backing calls runs on the trio thread.
"""

from fusemux.engines.kernel.device import EngineError, kernel_mount, kernel_umount, probe
from fusemux.engines.kernel.session import NAME, Session

__all__ = ["NAME", "EngineError", "Session", "kernel_mount", "kernel_umount", "probe"]
