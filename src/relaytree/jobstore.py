"""The job manager's database: one sqlite file per node, bounded by design.

Used by :mod:`relaytree.jobs` only (which documents the behaviour users see);
this module owns the file format, the transactions and the retention bounds.

* ``STATE_DIR/jobs.db``, stdlib :mod:`sqlite3`, one row per job (the spec as
  canonical JSON, the state, the process identity, the end).  The schema is
  versioned with ``PRAGMA user_version``; a file of a newer version, a file
  that is not a relaytree job store, or a damaged one is refused with a clear
  :class:`JobError` and left untouched (history is never deleted silently).
* ``journal_mode=WAL`` with ``synchronous=NORMAL``: a commit is an append to
  the WAL without fsync (the WAL is fsynced at checkpoints only).  A crash of
  the daemon loses nothing that was committed; a power loss may lose the last
  commits, which is acceptable because it also kills every running job (they
  come back as ``lost``) and a submit that vanished is re-submitted safely (ids
  make submit idempotent).  An fsync per job would cost more than the job.
* ``locking_mode=EXCLUSIVE``: the daemon holds the file's lock from open to
  close, so a second daemon on the same state dir fails at once with a clear
  error instead of sharing (and double-running) the queue; the WAL index then
  lives in heap memory, no ``-shm`` file.
* ``auto_vacuum=INCREMENTAL`` (set when the file is created): deleted rows give
  their pages back in small steps (``PRAGMA incremental_vacuum(N)`` after a
  purge, when enough pages are free), never by a stop-the-world ``VACUUM``.
* Retention: finished jobs are bounded by count, age and stored bytes (output
  kept plus the spec); every transaction that adds a finished job or a submit
  also deletes at most :data:`PURGE_BATCH` of the oldest finished jobs beyond
  a bound, so the store converges to its bounds with bounded work per job.
  Queued and running jobs are never purged.  Counters of finished jobs and
  bytes live in memory (one daemon per file: the lock says so), so no purge
  decision needs a scan.

Everything is synchronous and short: the manager calls it on the event loop.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["JobError", "JobStore", "Retention", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
#: Finished jobs deleted at most per transaction (bounded work per job).
PURGE_BATCH = 16
#: Every VACUUM_EVERY purges, free pages beyond VACUUM_THRESHOLD are given back,
#: VACUUM_PAGES at most (deleted rows' pages are reused by new rows meanwhile).
VACUUM_EVERY = 32
VACUUM_THRESHOLD = 256
VACUUM_PAGES = 256
#: WAL file size kept after a checkpoint (it is reused, not grown, below this).
WAL_SIZE_LIMIT = 4 << 20
#: sqlite caps the host parameters of one statement (999 before 3.32).
_IN_CHUNK = 500

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: names the job's directory
    job_id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,                     -- canonical JSON: what makes two submits the same
    slots INTEGER NOT NULL,
    submitter TEXT NOT NULL DEFAULT '',
    request_id TEXT NOT NULL DEFAULT '',
    submit_time REAL NOT NULL,
    start_time REAL,
    end_time REAL,                          -- NULL while queued or running
    rc INTEGER,
    pid INTEGER,                            -- the wrapper's pid = the job's process group
    pid_start INTEGER,                      -- /proc/PID/stat field 22 (clock ticks since boot)
    boot_id TEXT,
    kill_reason TEXT,                       -- 'kill' | 'timeout' once asked for
    error TEXT NOT NULL DEFAULT '',
    stdout_truncated INTEGER NOT NULL DEFAULT 0,
    stderr_truncated INTEGER NOT NULL DEFAULT 0,
    stored_bytes INTEGER NOT NULL DEFAULT 0  -- output kept + spec: the bytes bound counts this
);
CREATE INDEX jobs_finished ON jobs(end_time, seq) WHERE end_time IS NOT NULL;
"""


class JobError(Exception):
    """A clear message naming what is wrong; ``code`` is a short tag for programs.

    Codes: ``invalid`` (bad id or spec), ``exists`` (the id is taken by another
    spec), ``slots`` (more slots than the node has), ``queue_full``,
    ``no_space``, ``unknown`` (no such job), ``store`` (the database cannot be
    used), ``closed`` (the manager is not running).
    """

    def __init__(self, message: str, code: str = "invalid"):
        super().__init__(message)
        self.code = code


@dataclass
class Retention:
    """Bounds of the finished-job history kept on one node."""

    keep: int = 1000  # finished jobs
    max_age: float = 7 * 86400.0  # seconds after their end
    max_output_bytes: int = 256 << 20  # output (and spec) bytes of finished jobs

    def check(self) -> None:
        for name in ("keep", "max_output_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"retention {name} must be an int >= 0, not {value!r}")
        if isinstance(self.max_age, bool) or not isinstance(self.max_age, (int, float)) or not self.max_age >= 0:
            raise ValueError(f"retention max_age must be a number of seconds >= 0, not {self.max_age!r}")


def is_full(exc: BaseException) -> bool:
    """Is this sqlite/OS error a full disk (or quota)?"""
    if isinstance(exc, OSError):
        return exc.errno in (28, 122)  # ENOSPC, EDQUOT
    return isinstance(exc, sqlite3.Error) and "full" in str(exc).lower()


class JobStore:
    """The sqlite file of one node's jobs (see the module docstring)."""

    def __init__(self, path: str):
        self.path = path
        self.conn: Optional[sqlite3.Connection] = None
        self.store_id = ""
        self.finished_count = 0
        self.finished_bytes = 0
        self.oldest_end: Optional[float] = None
        self._purges = 0

    # -- open / close ---------------------------------------------------------------

    def open(self) -> None:
        """Open (or create) the file and take its lock; JobError if it cannot be used."""
        new = not os.path.exists(self.path)
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=0)
        except sqlite3.Error as exc:
            raise JobError(f"cannot open the job store {self.path}: {exc}", "store") from None
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            if new:
                conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # only before the first table
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            conn.execute("BEGIN EXCLUSIVE")  # takes the lock now, and holds it
            try:
                self._migrate(conn)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("integrity check failed: " + "; ".join(problems))
            self.store_id = conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()[0]
            row = conn.execute("SELECT count(*), total(stored_bytes), min(end_time) FROM jobs "
                               "WHERE end_time IS NOT NULL").fetchone()
        except JobError:
            conn.close()
            raise
        except sqlite3.Error as exc:
            conn.close()
            text = str(exc)
            if "locked" in text:
                raise JobError(f"the job store {self.path} is locked by another process (another relaytree "
                               "daemon with the same state dir?)", "store") from None
            if "not a database" in text or "malformed" in text or "integrity" in text:
                raise JobError(f"the job store {self.path} cannot be used: {text}. It was left as it is: "
                               "move it away to start with an empty job history", "store") from None
            raise JobError(f"cannot open the job store {self.path}: {text}", "store") from None
        self.conn = conn
        self.finished_count, self.finished_bytes, self.oldest_end = row[0], int(row[1]), row[2]

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise JobError(f"the job store {self.path} has schema version {version}, written by a newer "
                           f"relaytree (this one knows version {SCHEMA_VERSION}): upgrade relaytree", "store")
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        if tables:
            raise JobError(f"{self.path} is not a relaytree job store (it has tables {', '.join(tables)} "
                           "and no schema version); it was left as it is", "store")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("INSERT INTO meta VALUES ('store_id', ?), ('created', ?)",
                     (uuid.uuid4().hex[:12], repr(time.time())))
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    # -- reads ----------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self.conn is None:
            raise JobError("the job manager is not running", "closed")
        return self.conn

    def by_id(self, job_id: str) -> Optional[sqlite3.Row]:
        return self._db().execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()

    def by_seq(self, seq: int) -> Optional[sqlite3.Row]:
        return self._db().execute("SELECT * FROM jobs WHERE seq = ?", (seq,)).fetchone()

    def unfinished(self) -> List[sqlite3.Row]:
        """Queued and running jobs in submission order."""
        return self._db().execute("SELECT * FROM jobs WHERE end_time IS NULL ORDER BY seq").fetchall()

    def select(self, states: Optional[Sequence[str]], ids: Optional[Sequence[str]],
               limit: Optional[int]) -> List[sqlite3.Row]:
        """Jobs (newest submission last) filtered by state and id; at most ``limit`` (the newest)."""
        db = self._db()
        where, args = [], []  # type: List[str], List[Any]
        if states is not None:
            where.append("state IN (%s)" % ",".join("?" * len(states)))
            args.extend(states)
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        if ids is None:
            tail = " ORDER BY seq DESC" + (" LIMIT %d" % limit if limit is not None else "")
            rows = db.execute(sql + tail, args).fetchall()
        else:
            rows = []
            ids = list(dict.fromkeys(ids))
            for i in range(0, len(ids), _IN_CHUNK):
                part = ids[i:i + _IN_CHUNK]
                clause = "job_id IN (%s)" % ",".join("?" * len(part))
                rows += db.execute(sql + (" AND " if where else " WHERE ") + clause, args + part).fetchall()
            rows.sort(key=lambda r: r["seq"], reverse=True)
            if limit is not None:
                rows = rows[:limit]
        rows.reverse()
        return rows

    # -- writes ---------------------------------------------------------------------

    def _write(self, work, now: float, retention: Optional[Retention]) -> Tuple[Any, List[int]]:
        """Run work(conn) and a purge step in one transaction; (work's result, purged seqs).

        On any error the transaction is rolled back and nothing changed (in the
        file or in the counters); the error propagates.
        """
        db = self._db()
        counters = (self.finished_count, self.finished_bytes, self.oldest_end)
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work(db)
            purged = self._purge(db, now, retention) if retention is not None else []
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            self.finished_count, self.finished_bytes, self.oldest_end = counters
            raise
        if purged:
            self._purges += 1
            if self._purges % VACUUM_EVERY == 0:
                self._vacuum_step()
        return result, purged

    def insert(self, fields: Dict[str, Any], now: float, retention: Retention) -> Tuple[int, List[int]]:
        """Add a job (state queued); (its seq, purged seqs)."""
        names = sorted(fields)
        sql = "INSERT INTO jobs (%s) VALUES (%s)" % (",".join(names), ",".join("?" * len(names)))
        return self._write(lambda db: db.execute(sql, [fields[n] for n in names]).lastrowid, now, retention)

    def update(self, seq: int, fields: Dict[str, Any]) -> None:
        """Change an unfinished job (one statement: its own transaction)."""
        names = sorted(fields)
        sql = "UPDATE jobs SET %s WHERE seq = ?" % ",".join("%s = ?" % n for n in names)
        self._db().execute(sql, [fields[n] for n in names] + [seq])

    def finish(self, seq: int, fields: Dict[str, Any], now: float, retention: Retention) -> List[int]:
        """Record a job's end (fields must set end_time and stored_bytes); purged seqs."""
        names = sorted(fields)
        sql = "UPDATE jobs SET %s WHERE seq = ? AND end_time IS NULL" % ",".join("%s = ?" % n for n in names)

        def work(db: sqlite3.Connection) -> None:
            if db.execute(sql, [fields[n] for n in names] + [seq]).rowcount:
                self.finished_count += 1
                self.finished_bytes += fields["stored_bytes"]
                if self.oldest_end is None or fields["end_time"] < self.oldest_end:
                    self.oldest_end = fields["end_time"]

        return self._write(work, now, retention)[1]

    def purge(self, now: float, retention: Retention) -> List[int]:
        """A purge step on its own (at start, for instance), with a vacuum step."""
        purged = self._write(lambda db: None, now, retention)[1]
        self._vacuum_step()
        return purged

    def _over(self, retention: Retention, now: float) -> bool:
        return (self.finished_count > retention.keep or self.finished_bytes > retention.max_output_bytes
                or (self.oldest_end is not None and self.oldest_end < now - retention.max_age))

    def _purge(self, db: sqlite3.Connection, now: float, retention: Retention) -> List[int]:
        if not self._over(retention, now):
            return []
        rows = db.execute("SELECT seq, end_time, stored_bytes FROM jobs WHERE end_time IS NOT NULL "
                          "ORDER BY end_time, seq LIMIT ?", (PURGE_BATCH + 1,)).fetchall()
        doomed: List[int] = []
        for row in rows[:PURGE_BATCH]:
            self.oldest_end = row[1]
            if not self._over(retention, now):
                break
            doomed.append(row[0])
            self.finished_count -= 1
            self.finished_bytes -= row[2]
        else:
            self.oldest_end = rows[len(doomed)][1] if len(rows) > len(doomed) else None
        for i in range(0, len(doomed), _IN_CHUNK):
            part = doomed[i:i + _IN_CHUNK]
            db.execute("DELETE FROM jobs WHERE seq IN (%s)" % ",".join("?" * len(part)), part)
        return doomed

    def _vacuum_step(self) -> None:
        """Give free pages back in a bounded step (never a full VACUUM)."""
        db = self._db()
        try:
            if db.execute("PRAGMA freelist_count").fetchone()[0] > VACUUM_THRESHOLD:
                db.execute(f"PRAGMA incremental_vacuum({VACUUM_PAGES})").fetchall()
        except sqlite3.Error:
            pass  # space is given back at a later step

    def stats(self) -> Dict[str, int]:
        """Sizes of the store (for tests and benchmarks)."""
        db = self._db()
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        return {"rows": db.execute("SELECT count(*) FROM jobs").fetchone()[0],
                "finished": self.finished_count, "finished_bytes": self.finished_bytes,
                "db_bytes": page_size * pages,
                "free_pages": db.execute("PRAGMA freelist_count").fetchone()[0]}


def spec_json(spec: Dict[str, Any]) -> str:
    """Canonical JSON of a spec: equal specs give equal strings."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

