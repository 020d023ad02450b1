"""Progress lines for long loops over clips (sampling, video export, FVD), like the train loop's."""

from __future__ import annotations

import time
from collections.abc import Callable

from absl import logging


def format_progress(what: str, done: int, total: int, elapsed_s: float, unit: str = "clips") -> str:
    """'what: done/total unit (pct) | rate unit/s | ETA s' (the rate and ETA once anything is done)."""
    line = f"{what}: {done}/{total} {unit} ({100.0 * done / max(total, 1):.0f}%)"
    if done <= 0 or elapsed_s <= 0:
        return line
    rate = done / elapsed_s
    return f"{line} | {rate:.2f} {unit}/s | ETA {max(total - done, 0) / rate:.0f}s"


class Progress:
    """Counts finished items and logs a progress line at most every `every_s` seconds, and at the end.

    Throttled so a 50k-clip FVD run logs a line every few seconds, not one per batch.
    """

    def __init__(self, what: str, total: int, *, log: Callable[[str], None] | None = None,
                 every_s: float = 10.0, unit: str = "clips", clock: Callable[[], float] = time.perf_counter):
        self.what, self.total, self.unit, self.every_s, self.clock = what, int(total), unit, every_s, clock
        self.log = log if log is not None else logging.info
        self.done, self.started = 0, clock()
        self._last_logged = None

    def update(self, count: int) -> None:
        self.done += int(count)
        now = self.clock()
        finished = self.done >= self.total
        if finished or self._last_logged is None or now - self._last_logged >= self.every_s:
            self._last_logged = now
            self.log(format_progress(self.what, self.done, self.total, now - self.started, self.unit))
