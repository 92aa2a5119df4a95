#!/usr/bin/env python3
"""Job manager throughput: how many jobs one node's JobManager takes, and what each costs.

    .venv/bin/python bench/jobs_store.py [--jobs N] [--slots K] [--keep K] [--profile] [--json FILE]

Submits N jobs running `true` (shell='true', or argv=['true'] with --argv) to one JobManager (as fast as the queue takes them),
waits until all have ended, and reports jobs/s, the manager's own CPU per job
(the daemon's cost: submit + start + watch + record + purge) and the CPU of the
job processes themselves (the /bin/sh wrapper and `true`), next to a baseline
of starting the same `sh -c true` with subprocess from the same process.  The
retention bound (--keep, default 1000) is reached early, so most of the run
purges one job per finish: the steady state of a node.  The process imports the
daemon's modules (gRPC, protobuf) first so fork costs what it costs in the daemon.
With --profile, the top functions by own CPU time (cProfile) show where the time goes.
The machine is shared and noisy: compare the ratios, not the absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time

from relaytree import server  # noqa: F401 - the daemon's imports: fork cost as in the daemon
from relaytree.jobs import JobManager, JobSpec, Retention


def cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def baseline(n: int) -> dict:
    c0, k0, t0 = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    for _ in range(n):
        subprocess.run(["/bin/sh", "-c", "true"], stdin=subprocess.DEVNULL, start_new_session=True, check=True)
    wall = time.perf_counter() - t0
    return {"jobs": n, "wall_s": round(wall, 3), "per_s": round(n / wall, 1),
            "parent_cpu_ms_per_job": round((cpu(resource.RUSAGE_SELF) - c0) * 1000 / n, 3),
            "children_cpu_ms_per_job": round((cpu(resource.RUSAGE_CHILDREN) - k0) * 1000 / n, 3)}


async def run(state: str, n: int, slots: int, keep: int, profile: bool, argv: bool) -> dict:
    m = JobManager(state, slots=slots, retention=Retention(keep=keep))
    await m.start()
    # CPU time, not wall time: on a loaded machine wall time mostly measures the others.
    prof = cProfile.Profile(time.process_time) if profile else None
    last = f"b{n - 1}"

    c0, k0, t0 = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    if prof:
        prof.enable()
    submit_lat = []
    for i in range(n):
        s = time.perf_counter()
        await m.submit(JobSpec(id=f"b{i}", argv=["true"]) if argv else JobSpec(id=f"b{i}", shell="true"))
        submit_lat.append(time.perf_counter() - s)
    while True:
        rec = m.get(last, with_output=False)
        if rec is not None and rec.finished and not m.usage()["running"]:
            break
        await asyncio.sleep(0.2)  # rarely: this loop is not part of the cost
    if prof:
        prof.disable()
    wall = time.perf_counter() - t0
    own = cpu(resource.RUSAGE_SELF) - c0
    kids = cpu(resource.RUSAGE_CHILDREN) - k0
    stats = m.store.stats()
    states = {}
    for rec in m.list():
        states[rec.state] = states.get(rec.state, 0) + 1
    await m.close()
    db = os.path.join(state, "jobs.db")
    files = sum(len(f) for _, _, f in os.walk(os.path.join(state, "jobs")))
    decile = max(1, n // 10)  # submit latency in submission order: flat = the store does not slow down
    first = sum(submit_lat[:decile]) / decile
    last_ = sum(submit_lat[-decile:]) / decile
    submit_lat.sort()
    out = {
        "jobs": n, "command": "argv ['true']" if argv else "shell 'true'", "slots": slots, "keep": keep, "wall_s": round(wall, 3), "jobs_per_s": round(n / wall, 1),
        "manager_cpu_ms_per_job": round(own * 1000 / n, 3),
        "job_processes_cpu_ms_per_job": round(kids * 1000 / n, 3),
        "submit_ms_median": round(submit_lat[n // 2] * 1000, 3),
        "submit_ms_first_decile_mean": round(first * 1000, 3),
        "submit_ms_last_decile_mean": round(last_ * 1000, 3),
        "kept": states, "store": stats, "db_file_bytes": os.path.getsize(db),
        "wal_bytes": os.path.getsize(db + "-wal") if os.path.exists(db + "-wal") else 0,
        "files_in_jobs_dir": files, "rss_mib": round(rss_mib(), 1),
    }
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        out["profile"] = buf.getvalue()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=3000)
    p.add_argument("--slots", type=int, default=os.cpu_count() or 1)
    p.add_argument("--keep", type=int, default=1000)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--argv", action="store_true",
                   help="argv=['true'] (PATH lookup in a helper thread) instead of shell='true'")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--dir", metavar="DIR", help="where the state dir goes (default: $TMPDIR); e.g. a tmpfs")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="jobs-bench-", dir=args.dir) as tmp:
        base = baseline(min(args.jobs, 1000))
        result = asyncio.run(run(os.path.join(tmp, "state"), args.jobs, args.slots, args.keep, args.profile,
                                 args.argv))
    profile = result.pop("profile", None)
    report = {"baseline_subprocess_sh_true": base, "job_manager": result}
    print(json.dumps(report, indent=2))
    if profile:
        print(profile)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
