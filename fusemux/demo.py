"""The embedded demo: two exports on loop-mounted ext4 images, served at a printed mountpoint.

This module owns building the demo area (``fusemux demo``, run by ``make demo``)::

    DIR/images/gold.img, DIR/images/silver.img   ext4 images made with mkfs.ext4 -d
    DIR/fusemux.toml                             exports of fstype ext4, options "loop"
    DIR/state/                                   state_dir (backing mounts under state/mnt)
    DIR/mnt/                                     the fusemux mountpoint

The images are filled with one raw and one qcow2 volume made by qemu-img. Nothing is
mounted until a volume is opened; the daemon unmounts everything when it stops.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from fusemux.config import load_config
from fusemux.daemon import StartupError, run

EXPORTS = {
    "gold": [("vm1-root.raw", "raw", "64M"), ("vm1-data.qcow2", "qcow2", "1G")],
    "silver": [("vm2-root.qcow2", "qcow2", "2G"), ("scratch.raw", "raw", "16M")],
}
IMAGE_SIZE = "160M"


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def build(base: Path) -> Path:
    """Create (or reuse) the demo area under *base*; return the config path."""
    images = base / "images"
    images.mkdir(parents=True, exist_ok=True)
    (base / "mnt").mkdir(exist_ok=True)
    lines = [
        "# fusemux demo configuration (made by 'fusemux demo')",
        f'state_dir = "{base / "state"}"',
        "linger = 5.0",
        "mount_timeout = 30.0",
        "",
    ]
    for export, volumes in EXPORTS.items():
        image = images / f"{export}.img"
        if not image.exists():
            with tempfile.TemporaryDirectory(dir=base) as tmp:
                for name, fmt, size in volumes:
                    _run(["qemu-img", "create", "-q", "-f", fmt, str(Path(tmp) / name), size])
                _run(["mkfs.ext4", "-q", "-F", "-d", tmp, str(image), IMAGE_SIZE])
        lines += [
            f"[exports.{export}]",
            f'source = "{image}"',
            'fstype = "ext4"',
            'options = "loop"',
            "",
        ]
    config = base / "fusemux.toml"
    config.write_text("\n".join(lines))
    return config


def run_demo(directory: str) -> int:
    base = Path(directory).absolute()
    for tool in ("qemu-img", "mkfs.ext4"):
        if shutil.which(tool) is None:
            print(f"fusemux demo: {tool} is missing; run 'make setup' first")
            return 1
    config_path = build(base)
    config = load_config(config_path)
    mnt = base / "mnt"
    first = next(iter(EXPORTS))
    vol = f"{mnt}/volumes/{first}/{EXPORTS[first][0][0]}"
    print(
        f"""
fusemux demo: serving {len(config.exports)} exports at {mnt}
  config:   {config_path}
Try, in another shell:
  ls -l {mnt}/volumes/*/                       # listing an export mounts it
  getfattr -d -m user.fusemux {mnt}/volumes/{first}
  qemu-io -f raw -t none -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' {vol}
  getfattr -d -m user.fusemux {vol}
  fusemux status {mnt}
Exports unmount {config.linger:g}s after their last close. Press Ctrl-C to stop.
""",
        flush=True,
    )
    try:
        return run(config, str(mnt))
    except StartupError as e:
        print(f"fusemux demo: {e}")
        return 1
