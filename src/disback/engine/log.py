"""metrics.jsonl: one JSON object per evaluation of a stage, appended and flushed at once (a crash loses nothing);
the record of every run, which reports and benchmarks read back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from disback.distributed import is_writer
from disback.storage.files import write_text


class MetricsLog:
    """Appends one JSON object per evaluation to ``metrics.jsonl`` (flushed at once, so a crash loses nothing)."""

    def __init__(self, path: Path, tracker: Any | None = None):
        self.path, self.tracker = Path(path), tracker  # tracker: run.log_with's (engine.trackers), or None
        self.rewrite([])

    def rewrite(self, records: list[dict]) -> None:
        """Start the file again with ``records`` (a resumed run drops what came after its checkpoint)."""
        self.records = list(records)
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in records))

    def write(self, record: dict) -> None:
        self.records.append(record)
        if not is_writer():  # under several processes, the main one keeps the log
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "iteration"}
            self.tracker.log(numbers, step=record["iteration"])

    def finish(self) -> None:
        """The tracker's files are complete (metrics.jsonl always is)."""
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
