"""metrics.jsonl: one JSON object per evaluation of a stage, appended and flushed at once (a crash loses nothing);
the record of every run, which reports and benchmarks read back."""

from __future__ import annotations

import json
from pathlib import Path

from disback.distributed import is_writer
from disback.storage.files import write_text


class MetricsLog:
    """Appends one JSON object per evaluation to ``metrics.jsonl`` (flushed at once, so a crash loses nothing)."""

    def __init__(self, path: Path):
        self.path = Path(path)
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


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
