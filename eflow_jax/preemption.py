"""Stop signals: save at the next step boundary and exit 0 instead of dying mid-run.

    with PreemptionGuard((signal.SIGTERM, signal.SIGINT)) as guard:
        for step in ...:
            ...
            if guard.should_stop(step):   # the same answer on every process
                save(step); break
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import numpy as np
from absl import logging


class PreemptionGuard:
    """Turns SIGTERM (and optionally SIGINT) into "save and stop at the next step boundary".

    A repeat of a signal in `ignore_repeats` (default SIGTERM) is logged and ignored: `timeout`, SLURM
    and container runtimes may deliver TERM more than once, and a repeat must not kill the process
    while it saves (their SIGKILL still does). Any other signal is handed back to its previous handler
    on first receipt (SIG_DFL for Python's KeyboardInterrupt handler), so a second Ctrl-C quits at
    once, even while the main thread is inside a long compile. In multi-process runs all processes
    agree through an all-gather of the flag every `sync_every` steps (it blocks the host on the
    device, so it is not done every step). This handler takes SIGTERM over from jax's own
    preemption notifier.

    Args:
      signals: signals that request a stop.
      sync_every: multi-process only: how often (in steps) the processes compare flags.
      ignore_repeats: signals whose repeats are ignored rather than quitting.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,), *, sync_every: int = 10,
                 ignore_repeats: tuple[int, ...] = (signal.SIGTERM,)):
        self._signals = tuple(signals)
        self._ignore_repeats = frozenset(ignore_repeats)
        self._sync_every = max(1, int(sync_every))
        self._previous: dict[int, Any] = {}
        self._received: set[int] = set()
        self._requested = False

    @property
    def requested(self) -> bool:
        """Whether this process received a stop signal."""
        return self._requested

    def request_stop(self) -> None:
        """Sets the flag as a signal would (for tests and callers with their own triggers)."""
        self._requested = True

    def _handle(self, signum: int, frame: Any) -> None:
        if signum in self._received:  # only signals in ignore_repeats get here twice
            logging.warning("Received signal %d again: ignored, still saving and stopping at the next step.", signum)
            return
        self._received.add(signum)
        self._requested = True
        if signum in self._ignore_repeats:
            logging.warning("Received signal %d: saving and stopping at the next step.", signum)
            return
        logging.warning("Received signal %d: saving and stopping at the next step; send it again to quit at "
                        "once (steps since the last checkpoint are lost).", signum)
        previous = self._previous.get(signum, signal.SIG_DFL)
        if previous is None or previous is signal.default_int_handler:
            previous = signal.SIG_DFL  # a KeyboardInterrupt would wait for the main thread's C call
        signal.signal(signum, previous)

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            logging.warning("PreemptionGuard outside the main thread: signals are not caught.")
            return self
        for signum in self._signals:
            # An ignored signal stays ignored: `cmd &` in a script ignores SIGINT so that Ctrl-C in the
            # terminal does not reach background jobs.
            if signal.getsignal(signum) != signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def should_stop(self, step: int) -> bool:
        """Whether the loop should save and exit after `step`; the same answer on all processes."""
        if jax.process_count() == 1:
            return self._requested
        if int(step) % self._sync_every:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self._requested))
        return bool(np.any(flags))
