"""A JobManager in a process of its own, driven through stdin/stdout (one JSON object a line).

Used by tests/engine/test_jobs.py to SIGTERM or SIGKILL a job manager the way a daemon dies:

    python jobhost.py STATE_DIR [--slots N] [--kill-grace S]

prints {"ready": PID} once started, then answers each request line
{"op": "submit", "spec": {...JobSpec fields...}} / {"op": "kill", "id": ID} /
{"op": "get", "id": ID} with {"op": ..., "record": {...}} or {"op": ..., "error": MSG}.
SIGTERM or EOF on stdin: close the manager (jobs go on running) and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from relaytree.jobs import JobError, JobManager, JobSpec


def _out(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("state_dir")
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--kill-grace", type=float, default=1.0)
    args = p.parse_args()
    manager = JobManager(args.state_dir, slots=args.slots, kill_grace=args.kill_grace)
    await manager.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def handle(request: dict) -> None:
        op = request.get("op")
        try:
            if op == "submit":
                record, created = await manager.submit(JobSpec(**request["spec"]))
                _out({"op": op, "record": record.to_dict(), "created": created})
            elif op == "kill":
                _out({"op": op, "record": (await manager.kill(request["id"])).to_dict()})
            elif op == "get":
                record = manager.get(request["id"])
                _out({"op": op, "record": record.to_dict() if record else None})
            else:
                _out({"op": op, "error": "unknown op"})
        except JobError as exc:
            _out({"op": op, "error": str(exc)})

    async def read() -> None:
        while True:
            line = await reader.readline()
            if not line:
                stop.set()
                return
            loop.create_task(handle(json.loads(line)))

    reading = loop.create_task(read())
    _out({"ready": True})
    await stop.wait()
    reading.cancel()
    await manager.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
