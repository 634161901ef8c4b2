"""The benchmark harness: ``python -m tests.bench.run`` (what ``make bench`` runs).

This module owns the order of a benchmark run and its report. For each backing (ext4 on a
loop device, tmpfs) it starts A native, B fusemux (pyfuse3 engine), C mergerfs, D the bare
pyfuse3 passthrough and E fusemux-pt (fusemux on its passthrough engine) over one backing
file, then runs every fio workload in alternation (A B C D E per workload, all workloads per
repetition, repeated ``--reps`` times), recording each daemon's CPU time per run and, for B
and E, the GETXATTR, READ and WRITE requests the daemon saw. Then the lifecycle benchmarks
(for B and E where fusemux is measured). It prints a markdown table, writes it and the raw
JSON, and with ``--chart`` draws a PNG bar chart of the ratios (matplotlib, the ``bench``
extra).

Everything lives under one temporary directory; every mount, loop device and process is
undone in ``finally`` (see :mod:`tests.bench.systems`), and the directory is removed only
when nothing is mounted beneath it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fusemux import __version__
from fusemux.core.mounter import read_mountinfo
from tests.bench import systems as sysmod
from tests.bench import workloads as wl

FILE = "bench.dat"
# Paired ratios (median of the per-repetition ratios) kept in every fio cell as "a/b".
PAIRS = (
    ("fusemux", "passthrough"),
    ("fusemux", "mergerfs"),
    ("fusemux-pt", "native"),
    ("fusemux-pt", "mergerfs"),
    ("fusemux-pt", "fusemux"),
)
# Where each fusemux system's storm/RSS/ls -l figures go in the results ("storm": B, as
# before E was added).
STORM_KEYS = {"fusemux": "storm", "fusemux-pt": "storm_pt"}
# The ones the table shows, with their headings.
SHOWN_PAIRS = {
    "fusemux/passthrough": "B/D",
    "fusemux/mergerfs": "B/C",
    "fusemux-pt/native": "E/A",
    "fusemux-pt/mergerfs": "E/C",
}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def _git_rev() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "?"


def run_fio(args: argparse.Namespace, base: Path, kind: str, res: dict[str, Any]) -> None:
    """All fio workloads on one backing, alternating systems, *args.reps* times."""
    size = args.size_mib * wl.MiB
    chosen = [w for w in wl.FIO_WORKLOADS if any(s in w.name for s in args.workloads)]
    with sysmod.backing(base, kind, args.size_mib + 64) as src:
        wl.fill(src / FILE, size)
        with sysmod.systems(base / kind, src, tuple(args.systems)) as running:
            for name, system in running.items():
                if system.stats_root is not None:
                    info = sysmod.engine_info(system.stats_root)
                    info["stats_read_cost"] = system.stats_cost
                    res["meta"]["engines"].setdefault(name, info)
            out: dict[str, Any] = {}
            for rep in range(args.reps):
                for w in chosen:
                    cell = out.setdefault(w.name, {"unit": w.unit})
                    for name, system in running.items():
                        r = wl.fio_run(system, FILE, w, size, args.runtime)
                        cell.setdefault(name, {"runs": []})["runs"].append(r)
                        shown = r["error"] or f"{r['value']:.0f} {w.unit}"
                        if "requests" in r:
                            shown += " " + _requests(r["requests"])
                        print(f"  [{kind} rep {rep + 1}] {w.name:28s} {name:12s} {shown}")
            if args.offload_calls and kind == args.backings[0]:
                print(f"  [{kind}] offload cost x{args.offload_calls}")
                res["offload_us"] = wl.offload_cost(src / FILE, args.offload_calls)
            if args.open_iterations and kind == args.backings[0]:
                print(f"  [{kind}] warm open+close x{args.open_iterations}")
                res["open_close"] = wl.open_close_latency(running, FILE, args.open_iterations)
            res["fio"][kind] = summarize(out)


def summarize(out: dict[str, Any]) -> dict[str, Any]:
    """Medians, per-repetition ratios to native and ratios between the systems."""
    for cell in out.values():
        base = [r["value"] for r in cell.get("native", {}).get("runs", [])]
        for name in sysmod.SYSTEMS:
            if name not in cell:
                continue
            runs = cell[name]["runs"]
            vals = [r["value"] for r in runs if r["value"] is not None]
            cell[name]["median"] = _median(vals)
            cell[name]["errors"] = sorted({r["error"] for r in runs if r["error"]})
            cpu = [r["cpu_s"] / r["wall_s"] for r in runs if r["cpu_s"] is not None]
            cell[name]["cpu_pct"] = _median([100 * c for c in cpu]) if cpu else None
            if base and name != "native":
                ratios = [
                    r["value"] / b
                    for r, b in zip(runs, base, strict=False)
                    if r["value"] is not None and b
                ]
                cell[name]["ratios_to_native"] = ratios
                cell[name]["median_ratio"] = _median(ratios)
            counted = [r["requests"] for r in runs if "requests" in r]
            if counted:
                cell[name]["requests_median"] = {
                    op: _median([c[op] for c in counted]) for op in wl.COUNTED
                }
        for a, b in PAIRS:
            if a in cell and b in cell:
                pairs = [
                    x["value"] / y["value"]
                    for x, y in zip(cell[a]["runs"], cell[b]["runs"], strict=False)
                    if x["value"] is not None and y["value"]
                ]
                cell[f"{a}/{b}"] = _median(pairs)
    return out


def _fmt(v: float | None, digits: int = 0) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def _requests(counts: dict[str, int]) -> str:
    return " ".join(f"{op} {counts[op]}" for op in wl.COUNTED)


def _heading(name: str) -> str:
    return f"{sysmod.LETTERS[name]} {name}"


def requests_table(res: dict[str, Any]) -> list[str]:
    """The requests B and E saw per fio run: GETXATTR, READ, WRITE, one figure per repetition."""
    fused = [
        n for n in sysmod.ENGINES if any(n in c for cs in res["fio"].values() for c in cs.values())
    ]
    if not fused:
        return []
    lines = [
        "",
        "### requests the daemon saw per run (from user.fusemux.engine_stats; per repetition)",
        "",
        "| backing | workload | "
        + " | ".join(f"{sysmod.LETTERS[n]} {op}" for n in fused for op in wl.COUNTED)
        + " |",
        "|---|---|" + "---:|" * (len(fused) * len(wl.COUNTED)),
    ]
    other: dict[str, dict[str, int]] = {n: {} for n in fused}
    for kind, cells in res["fio"].items():
        for wname, cell in cells.items():
            cols = []
            for n in fused:
                runs = [r for r in cell.get(n, {}).get("runs", []) if "requests" in r]
                for op in wl.COUNTED:
                    cols.append("/".join(f"{r['requests'][op]:,}" for r in runs) or "—")
                for r in runs:
                    for k, v in r["requests_other"].items():
                        other[n][k] = other[n].get(k, 0) + v
            lines.append(f"| {kind} | {wname} | " + " | ".join(cols) + " |")
    lines.append("")
    for n in fused:
        eng = res["meta"].get("engines", {}).get(n, {})
        moved = ", ".join(f"{k} {v:,}" for k, v in sorted(other[n].items())) or "none"
        lines.append(
            f"- {_heading(n)}: engine {eng.get('engine', '?')}, kernel passthrough "
            f"{'on' if eng.get('passthrough') else 'off'}; other counters over all runs: {moved}"
        )
    return lines


def table(res: dict[str, Any]) -> str:
    lines: list[str] = []
    m = res["meta"]
    fl = m.get("fio_load1")
    fio_load = f"{fl['min']:.1f}/{fl['median']:.1f}/{fl['max']:.1f} (min/median/max)" if fl else "—"
    lines.append(
        f"fusemux {m['version']} ({m['git']}), {m['date']}, kernel {m['kernel']}, "
        f"{m['cpus']} CPUs, load average {m['loadavg_before']} before, "
        f"{m['loadavg_after_fio']} after fio, {m['loadavg_after']} at the end (the storm's "
        f"blocked threads count in it); 1-min load at the start of the fio runs {fio_load}; "
        f"{m['reps']} repetitions x {m['runtime_s']} s, "
        f"file {m['size_mib']} MiB; mergerfs -o {m['mergerfs_options']}"
    )
    for note in m.get("notes", []):  # added by hand to a run's JSON, e.g. a correction
        lines += ["", f"Note: {note}"]
    for kind, cells in res["fio"].items():
        heads = [_heading(n) for n in sysmod.SYSTEMS] + list(SHOWN_PAIRS.values())
        lines += [
            "",
            f"### fio, backing {kind} (median; ratio to native per repetition; daemon CPU %)",
            "",
            "| workload | " + " | ".join(heads) + " |",
            "|---|" + "---:|" * len(heads),
        ]
        for wname, cell in cells.items():
            cols = []
            for name in sysmod.SYSTEMS:
                c = cell.get(name)
                if c is None:
                    cols.append("—")
                    continue
                text = _fmt(c["median"]) + " " + cell["unit"]
                if c.get("errors") and c["median"] is None:
                    text = "fails: " + c["errors"][0][:40]
                if name != "native" and c.get("ratios_to_native"):
                    text += " (" + "/".join(f"{r:.2f}" for r in c["ratios_to_native"]) + "×)"
                if c.get("cpu_pct") is not None:
                    text += f" {c['cpu_pct']:.0f}%"
                cols.append(text)
            ratios = [_fmt(cell.get(k), 2) for k in SHOWN_PAIRS]
            lines.append(f"| {wname} | " + " | ".join(cols + ratios) + " |")
    lines += requests_table(res)
    if "open_close" in res:
        oc = res["open_close"]
        lines += ["", "### warm open+close (µs)", "", "| system | n | median | p99 |"]
        lines.append("|---|---:|---:|---:|")
        for name, v in oc.items():
            lines.append(
                f"| {_heading(name)} | {v['n']} | {v['median_us']:.0f} | {v['p99_us']:.0f} |"
            )
        if "fusemux" in oc and "fusemux-pt" in oc:
            b, e = oc["fusemux"], oc["fusemux-pt"]
            lines += [
                "",
                f"E/B: median {e['median_us'] / b['median_us']:.2f}×, "
                f"p99 {e['p99_us'] / b['p99_us']:.2f}× (target: within 1.5×)",
            ]
    if "offload_us" in res:
        lines += ["", "### cost of one 4 KiB pread from a trio task, one at a time (µs)", ""]
        lines.append(" | ".join(f"{k} {v:.1f}" for k, v in res["offload_us"].items()))
    if "first_open" in res:
        f = res["first_open"]
        lines += [
            "",
            "### first open of an unmounted ext4 (-o loop) export (ms, median of "
            f"{f['repetitions']})",
            "",
            f"plain mount(8)+open {f['plain_median_ms']:.1f} ms",
        ]
        for name in sysmod.ENGINES:
            if f"{name}_median_ms" in f:
                ms = f[f"{name}_median_ms"]
                lines[-1] += (
                    f"; {_heading(name)} LOOKUP+mount+open {ms:.1f} ms "
                    f"({ms - f['plain_median_ms']:+.1f} ms, mounts made: "
                    f"{f[f'{name}_mounts']} for {f['repetitions']} first opens)"
                )
    storms = {n: res[STORM_KEYS[n]] for n in sysmod.ENGINES if STORM_KEYS[n] in res}
    if storms:
        lines += ["", "### mount storm, RSS, ls -l", ""]
    for name, s in storms.items():
        lines += [
            f"- {_heading(name)} storm: {s['opens']} concurrent first opens over "
            f"{s['exports']} exports in {s['storm_s']:.2f} s, {s['open_ok']} succeeded, "
            f"{s['mounts']} mounts made (one per export: "
            f"{'yes' if s['mounts'] == s['exports'] else 'NO'})",
            f"- {_heading(name)} daemon RSS: {s['rss_idle_mib']:.1f} MiB idle, "
            f"{s['rss_open_mib']:.1f} MiB with {s['open_during_rss']} volumes open",
            f"- {_heading(name)} ls -l of {s['listing']} volumes: {s['ls_cold_s']:.2f} s cold "
            f"(export unmounted), {s['ls_warm_s']:.2f} s warm, native {s['ls_native_s']:.2f} s",
        ]
    return "\n".join(lines) + "\n"


def chart(res: dict[str, Any], path: Path) -> None:
    """Grouped bars of the median ratio to native per workload, one panel per backing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(res["fio"])
    fig, axes = plt.subplots(len(kinds), 1, figsize=(11, 4.2 * len(kinds)), squeeze=False)
    shown = [s for s in sysmod.SYSTEMS if s != "native"]
    for ax, kind in zip(axes[:, 0], kinds, strict=True):
        cells = res["fio"][kind]
        names = list(cells)
        width = 0.8 / len(shown)
        every: list[float] = []
        for i, sysname in enumerate(shown):
            vals = [(cells[n].get(sysname) or {}).get("median_ratio") or 0 for n in names]
            every += [v for v in vals if v > 0]
            xs = [j + (i - (len(shown) - 1) / 2) * width for j in range(len(names))]
            ax.bar(xs, vals, width, label=f"{sysmod.LETTERS[sysname]} {sysname}")
        ax.set_yscale("log")
        ax.set_ylim(min([0.005, *every]) * 0.8, max([2.0, *every]) * 1.2)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("ratio to native (log)")
        ax.set_title(f"backing {kind}: median ratio to native, {res['meta']['reps']} reps")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--runtime", type=float, default=3.0, help="seconds per fio run")
    p.add_argument("--size-mib", type=int, default=256, help="size of the benchmark file")
    p.add_argument("--backings", nargs="*", default=["ext4", "tmpfs"])
    p.add_argument("--systems", nargs="+", default=list(sysmod.SYSTEMS))
    p.add_argument("--workloads", nargs="+", default=[""], help="substrings of workload names")
    p.add_argument("--open-iterations", type=int, default=10_000)
    p.add_argument("--first-open-reps", type=int, default=10)
    p.add_argument("--offload-calls", type=int, default=5000, help="per variant and round")
    p.add_argument("--storm-exports", type=int, default=100)
    p.add_argument("--storm-per-export", type=int, default=10)
    p.add_argument("--listing", type=int, default=10_000)
    p.add_argument("--no-lifecycle", action="store_true")
    p.add_argument("--dir", type=Path, default=None, help="work directory (default: /var/tmp)")
    p.add_argument("--json", type=Path, default=Path("bench-results.json"))
    p.add_argument("--table", type=Path, default=Path("bench-results.md"))
    p.add_argument("--chart", type=Path, default=None, help="PNG of the ratios (matplotlib)")
    args = p.parse_args(argv)
    if "native" not in args.systems:
        args.systems.insert(0, "native")
    args.systems = [s for s in sysmod.SYSTEMS if s in args.systems]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if os.geteuid() != 0:
        print("the benchmarks mount filesystems: run them as root", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="fusemux-bench-", dir=args.dir or "/var/tmp"))
    base.chmod(0o755)
    res: dict[str, Any] = {
        "meta": {
            "version": __version__,
            "git": _git_rev(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "loadavg_before": _loadavg(),
            "reps": args.reps,
            "runtime_s": args.runtime,
            "size_mib": args.size_mib,
            "mergerfs_options": sysmod.MERGERFS_OPTIONS,
            "engines": {},
            "fio": subprocess.run(
                ["fio", "--version"], capture_output=True, text=True
            ).stdout.strip(),
        },
        "fio": {},
    }
    try:
        for kind in args.backings:
            print(f"fio on {kind}")
            run_fio(args, base, kind, res)
        loads = [
            r["load1"]
            for cells in res["fio"].values()
            for cell in cells.values()
            for name in sysmod.SYSTEMS
            for r in cell.get(name, {}).get("runs", [])
        ]
        if loads:
            res["meta"]["fio_load1"] = {
                "min": min(loads),
                "median": _median(loads),
                "max": max(loads),
            }
        res["meta"]["loadavg_after_fio"] = _loadavg()
        fused = [n for n in sysmod.ENGINES if n in args.systems]
        if not args.no_lifecycle and fused:
            print("first open: " + ", ".join(fused))
            res["first_open"] = wl.first_open(base / "first", args.first_open_reps, fused)
            for name in fused:
                print(f"mount storm, RSS, ls -l: {name}")
                res[STORM_KEYS[name]] = wl.storm_ls_rss(
                    base / "storm" / name,
                    args.storm_exports,
                    args.storm_per_export,
                    args.listing,
                    name,
                )
    finally:
        left = [m.mountpoint for m in read_mountinfo() if m.mountpoint.startswith(f"{base}/")]
        if left:
            print(f"not removing {base}: still mounted: {left}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    res["meta"]["loadavg_after"] = _loadavg()
    text = table(res)
    for out in (args.json, args.table, args.chart):
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
    print()
    print(text)
    args.json.write_text(json.dumps(res, indent=1) + "\n")
    args.table.write_text(text)
    if args.chart is not None:
        chart(res, args.chart)
        print(f"chart: {args.chart}")
    print(f"results: {args.json}, {args.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
