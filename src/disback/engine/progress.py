"""Progress of a long loop: a bar in a terminal; in a log (a cluster job, nohup, CI) one plain line per evaluation and
at most one a minute in between, instead of a carriage-return update every tenth of a second."""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm


class Lines:
    """tqdm's interface (iterate, ``set_postfix``) as log lines on stderr."""

    def __init__(self, iterable: Iterable, desc: str, every_s: float = 60.0):
        self.iterable, self.desc, self.every_s = iterable, desc, every_s
        self.total = len(iterable) if hasattr(iterable, "__len__") else None
        self.done, self.begun, self.last = 0, time.perf_counter(), time.perf_counter()

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            self.done += 1  # counted before the body runs, so that an evaluation's line says which step it follows
            yield item
            if time.perf_counter() - self.last >= self.every_s:
                self.write({})

    def set_postfix(self, values: dict[str, Any]) -> None:
        """An evaluation: its values in one line now."""
        self.write(values)

    def write(self, values: dict[str, Any]) -> None:
        self.last = time.perf_counter()
        rate = self.done / max(self.last - self.begun, 1e-9)
        total = f"/{self.total} ({100 * self.done / self.total:.0f}%)" if self.total else ""
        extra = "".join(f", {k} {v}" for k, v in values.items())
        print(f"{self.desc}: {self.done}{total}, {rate:.3g} it/s{extra}", file=sys.stderr, flush=True)


def progress(iterable: Iterable, desc: str, show: bool) -> Any:
    """A progress bar over ``iterable`` in a terminal, log lines elsewhere, nothing when ``show`` is off."""
    if show and not sys.stderr.isatty():
        return Lines(iterable, desc)
    return tqdm(iterable, desc=desc, disable=not show, leave=False, dynamic_ncols=True)
