"""The main job's view of the trainer: the status file `python -m train.loop --status-file` appends to.

One JSON object a line, {"event", "unix_time", ...}, written by the trainer's rank 0 in one write
and fsynced: "ready" once it serves (its admin address, world size, the version it starts from),
then one "cycle" record per training cycle (the cycle's metrics, "published", "version", and
"ranks": what every rank reported at its end). Under torchrun the trainer's stdout carries the
lines of every rank, prefixed; the file carries rank 0's records only, unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path


class TrainerStatus:
    """Reads the status file as it grows. A last line without its newline is a write in progress:
    it is left for the next poll."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: list[dict] = []
        self._offset = 0

    def poll(self) -> list[dict]:
        """The records appended since the last poll (also kept in self.records)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data[:data.rfind(b"\n") + 1]
        self._offset += len(complete)
        new = [json.loads(line) for line in complete.splitlines() if line.strip()]
        self.records.extend(new)
        return new

    def of(self, event: str) -> list[dict]:
        """Every record of this event read so far, oldest first."""
        return [r for r in self.records if r.get("event") == event]

    def ready(self) -> dict | None:
        """The trainer's latest "ready" record after a poll (None before it wrote one): a callback for
        ChildProcess.wait_until, which also notices the trainer exiting before it is ready."""
        self.poll()
        return ready[-1] if (ready := self.of("ready")) else None
