"""The pipeline ledger: one SQLite record per (task, user, stage), keyed by a fingerprint of its inputs.

Only the driver writes it (the workers return results), so there is one writer; ``cdcda pipeline
status`` reads it concurrently (WAL journal). A record is ``running`` from dispatch until its result
comes back, then ``done``, ``failed`` or ``skipped``; a driver killed in between leaves ``running``,
which the next run treats as not done. A stage's output directory is renamed into place before its
record says ``done``, so ``done`` always has a complete output behind it; the reverse (output renamed,
record still ``running``) reruns the stage, which replaces the output atomically.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    task        TEXT NOT NULL,
    user        TEXT NOT NULL,
    stage       TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed', 'skipped')),
    attempts    INTEGER NOT NULL DEFAULT 0,
    inputs      TEXT,
    result      TEXT,
    error       TEXT,
    worker      TEXT,
    started_at  REAL,
    finished_at REAL,
    seconds     REAL,
    PRIMARY KEY (task, user, stage)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


def fingerprint(inputs: dict) -> str:
    """sha256 of the canonical JSON of a stage's inputs."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Record:
    task: str
    user: str
    stage: str
    fingerprint: str
    status: str
    attempts: int
    inputs: dict | None
    result: dict | None
    error: str | None
    worker: str | None
    started_at: float | None
    finished_at: float | None
    seconds: float | None


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)  # autocommit
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -------------------------------------------------------------- reads
    def get(self, task: str, user: str, stage: str) -> Record | None:
        row = self.db.execute("SELECT * FROM records WHERE task=? AND user=? AND stage=?",
                              (task, user, stage)).fetchone()
        return self._record(row) if row else None

    def all(self) -> Iterator[Record]:
        for row in self.db.execute("SELECT * FROM records ORDER BY task, user, stage"):
            yield self._record(row)

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM records").fetchone()[0]

    @staticmethod
    def _record(row) -> Record:
        (task, user, stage, fp, status, attempts, inputs, result, error, worker, t0, t1, secs) = row
        return Record(task, user, stage, fp, status, attempts, json.loads(inputs) if inputs else None,
                      json.loads(result) if result else None, error, worker, t0, t1, secs)

    # -------------------------------------------------------------- writes (the driver only)
    def start(self, task: str, user: str, stage: str, fp: str, inputs: dict) -> int:
        """Mark a dispatch; returns the attempt number (1 for the first try of this fingerprint)."""
        old = self.get(task, user, stage)
        attempts = (old.attempts if old and old.fingerprint == fp and old.status in ("running", "failed") else 0) + 1
        self.db.execute(
            "INSERT INTO records (task, user, stage, fingerprint, status, attempts, inputs, result, error, worker, "
            "started_at, finished_at, seconds) VALUES (?,?,?,?,'running',?,?,NULL,NULL,NULL,?,NULL,NULL) "
            "ON CONFLICT(task, user, stage) DO UPDATE SET fingerprint=excluded.fingerprint, status='running', "
            "attempts=excluded.attempts, inputs=excluded.inputs, result=NULL, error=NULL, worker=NULL, "
            "started_at=excluded.started_at, finished_at=NULL, seconds=NULL",
            (task, user, stage, fp, attempts, json.dumps(inputs, sort_keys=True, default=str), time.time()))
        return attempts

    def finish(self, task: str, user: str, stage: str, fp: str, status: str, *, result: Any = None,
               error: str | None = None, worker: str | None = None, seconds: float | None = None) -> None:
        assert status in ("done", "failed", "skipped")
        self.db.execute(
            "UPDATE records SET status=?, result=?, error=?, worker=?, finished_at=?, seconds=? "
            "WHERE task=? AND user=? AND stage=? AND fingerprint=?",
            (status, json.dumps(result, default=str) if result is not None else None, error, worker, time.time(),
             seconds, task, user, stage, fp))

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                        (key, json.dumps(value, default=str)))

    def meta(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else None
