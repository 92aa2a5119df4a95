#!/usr/bin/env python3
"""Relay engine benchmark: N real daemons on this machine, figures next to a baseline.

    .venv/bin/python bench/engine.py [--quick] [--json FILE]

exec: wall time of `relaytree exec -- true` over N = 10/50/100 daemons at width
2/8/32 (median of several runs), next to running the same command N times locally
(the cost of the processes themselves, no network).
copy: 256 MiB to N daemons at width 1/2/4: wall time, MB/s delivered per node and
CPU-seconds per GiB per node (all daemons + the client), next to `cp` of the file
into N directories in the same run.  Files land on a tmpfs so the disk is not what
is measured.  The machine is shared and noisy: compare the ratios, not the absolutes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from localfleet import Fleet  # noqa: E402

from relaytree import client as rclient  # noqa: E402
from relaytree.results import Status  # noqa: E402

MIB = 1 << 20


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def start_fleet(tmp: Path, count: int) -> Fleet:
    return Fleet(tmp / ("fleet%d" % count), count).start()


def bench_exec(tmp: Path, sizes, widths, repeats: int) -> list:
    rows = []
    for count in sizes:
        fleet = start_fleet(tmp, count)
        try:
            c = rclient.Client(port=fleet.port)
            c.exec(fleet.names, "true", width=8)  # warm: channels, page cache
            t = time.perf_counter()
            for _ in range(count):
                subprocess.run(["sh", "-c", "true"], check=True)
            baseline = time.perf_counter() - t
            for width in widths:
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    out = c.exec(fleet.names, "true", width=width)
                    times.append(time.perf_counter() - t)
                    assert all(o.status is Status.PASS for o in out.values()), out
                wall = statistics.median(times)
                rows.append({"nodes": count, "width": width, "wall_s": round(wall, 4),
                             "min_s": round(min(times), 4),
                             "baseline_local_s": round(baseline, 4),
                             "ratio_to_baseline": round(wall / baseline, 2)})
                print("exec  N=%-3d width=%-2d  median %6.3fs  min %6.3fs   baseline (N local "
                      "sh -c true) %6.3fs   ratio %5.2f" % (count, width, wall, min(times), baseline,
                                                            wall / baseline), flush=True)
        finally:
            fleet.stop()
    return rows


def bench_copy(tmp: Path, count: int, size_mib: int, widths, chunk: int) -> list:
    rows = []
    src = tmp / "src.bin"
    with open(src, "wb") as fh:
        for _ in range(size_mib):
            fh.write(os.urandom(MIB))
    size = size_mib * MIB
    gib = size / (1 << 30)
    fleet = start_fleet(tmp, count)
    try:
        # Baseline: cp of the file into N directories on the same tmpfs.
        t = time.perf_counter()
        for i in range(count):
            d = tmp / "cp" / str(i)
            d.mkdir(parents=True)
            subprocess.run(["cp", str(src), str(d / "f")], check=True)
        cp_wall = time.perf_counter() - t
        shutil.rmtree(tmp / "cp")
        c = rclient.Client(port=fleet.port)
        for width in widths:
            cpu0 = sum(d.cpu_seconds() for d in fleet.daemons) + own_cpu()
            t = time.perf_counter()
            out = c.copy(fleet.names, str(src), "/data/f", width=width, mkdirs=True, chunk_size=chunk)
            wall = time.perf_counter() - t
            cpu = sum(d.cpu_seconds() for d in fleet.daemons) + own_cpu() - cpu0
            assert all(o.status is Status.PASS for o in out.values()), out
            peak = max(d.rss_kib() for d in fleet.daemons) / 1024
            for d in fleet.daemons:
                (d.base_dir / "data" / "f").unlink()
            rows.append({"nodes": count, "size_mib": size_mib, "width": width, "chunk": chunk,
                         "wall_s": round(wall, 3), "mb_s_per_node": round(size / wall / 1e6, 1),
                         "cpu_s_per_gib_per_node": round(cpu / gib / count, 3),
                         "peak_rss_mib": round(peak), "cp_baseline_s": round(cp_wall, 3),
                         "ratio_to_cp": round(wall / cp_wall, 2)})
            print("copy  N=%-3d %d MiB width=%d chunk=%dK  %6.2fs  %6.1f MB/s/node  "
                  "%.2f CPU-s/GiB/node  peak RSS %d MiB   cp baseline %6.2fs   ratio %5.2f"
                  % (count, size_mib, width, chunk >> 10, wall, size / wall / 1e6,
                     cpu / gib / count, peak, cp_wall, wall / cp_wall), flush=True)
    finally:
        fleet.stop()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--skip-exec", action="store_true")
    parser.add_argument("--skip-copy", action="store_true")
    args = parser.parse_args()
    sizes = [10, 20] if args.quick else [10, 50, 100]
    size_mib = 32 if args.quick else 256
    results = {"machine": {"cpus": os.cpu_count(), "load": os.getloadavg()}}
    tmp = Path(tempfile.mkdtemp(prefix="relaytree-bench-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6g", "tmpfs", str(tmp)],
                             capture_output=True).returncode == 0
    try:
        if not args.skip_exec:
            results["exec"] = bench_exec(tmp, sizes, [2, 8, 32], repeats=3 if args.quick else 5)
        if not args.skip_copy:
            results["copy"] = bench_copy(tmp, 10, size_mib, [1, 2, 4], rclient.DEFAULT_CHUNK)
            # Chunk size, at the default copy width.
            results["chunk"] = [row for chunk in (256 << 10, 4 << 20)
                                for row in bench_copy(tmp, 10, size_mib, [rclient.DEFAULT_COPY_WIDTH], chunk)]
    finally:
        if mounted:
            subprocess.run(["umount", str(tmp)])
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
