"""The trainer's durable feedback store: SQLite, one row per event id (the dedupe key).

A batch is written in one transaction with synchronous=FULL, so once `commit_batch`
returns the rows survive a crash; only then does the consumer commit its Kafka offsets.
"""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
  event_id TEXT PRIMARY KEY, kind TEXT NOT NULL, record BLOB NOT NULL,
  topic TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL, stored_unix_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS interactions (
  response_id TEXT PRIMARY KEY, model_version TEXT NOT NULL, record BLOB NOT NULL,
  topic TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL, stored_unix_ms INTEGER NOT NULL);
"""


class FeedbackStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def commit_batch(self, feedback: list[tuple], interactions: list[tuple]) -> tuple[int, int]:
        """feedback rows (event_id, kind, record, topic, partition, offset); interaction rows
        (response_id, model_version, record, topic, partition, offset). Returns (new, duplicates)."""
        now = int(time.time() * 1000)
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            before = self.db.total_changes
            cur.executemany("INSERT OR IGNORE INTO feedback VALUES (?,?,?,?,?,?,?)", [(*r, now) for r in feedback])
            new_fb = self.db.total_changes - before
            cur.executemany("INSERT OR IGNORE INTO interactions VALUES (?,?,?,?,?,?,?)",
                            [(*r, now) for r in interactions])
            cur.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:   # a failed COMMIT may have rolled back already: keep its error, not ROLLBACK's
                cur.execute("ROLLBACK")
            raise
        return new_fb, len(feedback) - new_fb

    def count(self, table: str = "feedback") -> int:
        assert table in ("feedback", "interactions")
        return self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    def event_ids(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT event_id FROM feedback")]

    def records(self, table: str = "feedback", since_rowid: int = 0) -> list[tuple[int, bytes]]:
        assert table in ("feedback", "interactions")
        return list(self.db.execute(f"SELECT rowid, record FROM {table} WHERE rowid > ? ORDER BY rowid",
                                    (since_rowid,)))

    def latest(self, table: str, limit: int) -> list[bytes]:
        """The `limit` most recently stored records of a table, newest first."""
        assert table in ("feedback", "interactions")
        return [r[0] for r in self.db.execute(f"SELECT record FROM {table} ORDER BY rowid DESC LIMIT ?", (limit,))]

    def close(self) -> None:
        self.db.close()
