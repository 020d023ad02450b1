"""What the training loop needs to keep the accelerator busy, beside train.py's loop.

  DevicePrefetcher   the next batches go host -> device in a background thread while the step runs;
                     checkpoints record the position of the last batch *consumed*.
  MetricSums         per-step metrics summed on the device: one small dispatch per step, one
                     device -> host copy per log step (no per-step clu Collection, no host sync).
  Clock              where the wall time of a log window went: waiting for input, for the device,
                     or host work (bookkeeping, checkpoints, samples).
  workers_started_early  the data workers start (spawn, imports, first clips) while the step compiles.
"""

from __future__ import annotations

import collections
import contextlib
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp


class DevicePrefetcher:
    """Iterates over device batches `size` ahead of the consumer.

    A background thread runs the host pipeline (grain's next(), decoding) ahead into a queue; the
    host -> device copies are issued from the consumer's thread, `size` batches ahead, right before
    it dispatches a step, so they overlap the step (device_put is asynchronous). No other thread
    touches the device: XLA captures CUDA graphs (cuDNN attention) on an executable's first run,
    and a transfer issued from another thread during that capture fails it ("capturing stream has
    unjoined work", seen on an H200). `get_state` reports the grain position recorded right after
    the last batch the loop received: a checkpoint resumes with the next batch the model has not
    seen. Restore into `host_iter` before wrapping it.

    Args:
      host_iter: a grain DatasetIterator (next() -> per-process numpy batch, get_state() -> dict).
      put: per-process numpy batch -> device batch (e.g. sharding.to_global_batch on the mesh).
      size: batches in flight on the device besides the one the step uses (also how many host
        batches the thread prepares ahead).
    """

    def __init__(self, host_iter, put: Callable[[Any], Any], size: int = 2):
        self._host_iter, self._put, self._size = host_iter, put, max(1, size)
        self._queue: queue.Queue = queue.Queue(maxsize=self._size)
        self._on_device: collections.deque = collections.deque()
        self._state = host_iter.get_state()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                item = (next(self._host_iter), self._host_iter.get_state())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised in its thread.
            self._queue.put(_Raised(e))

    def __iter__(self) -> Iterator:
        return self

    def _take_host(self):
        item = self._queue.get()
        if isinstance(item, _Raised):
            self._queue.put(item)  # Every later next() raises too.
            raise item.error
        return item

    def __next__(self):
        if self._thread is None:  # Started lazily: nothing runs ahead before the loop asks.
            self._thread = threading.Thread(target=self._fill, name="host_prefetch", daemon=True)
            self._thread.start()
        if not self._on_device:
            batch, state = self._take_host()
            self._on_device.append((self._put(batch), state))
        out, self._state = self._on_device.popleft()
        while len(self._on_device) < self._size:  # Copies start now and overlap the coming step.
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Raised):  # Raised when the loop gets there, not a batch early.
                self._queue.put(item)
                break
            batch, state = item
            self._on_device.append((self._put(batch), state))
        return out

    def get_state(self) -> bytes:
        """The host iterator's state after the last consumed batch, as grain's checkpoint handler
        stores a non-DatasetIterator's state (JSON bytes; restore it into the host iterator)."""
        return json.dumps(self._state, indent=4).encode()

    def close(self) -> None:
        """Stops the thread, then closes the host iterator (its state stays readable)."""
        self._stop.set()
        self._on_device.clear()
        if self._thread is not None:
            while True:  # Unblock a producer waiting on a full queue.
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._thread.join(timeout=10)
        close = getattr(self._host_iter, "close", None)
        if close is not None:  # Ends grain's worker processes with the loop, not at interpreter exit.
            close()


@contextlib.contextmanager
def workers_started_early(host_iter, enabled: bool = True):
    """Starts grain's worker processes in the background for the duration of the block (the compile).

    Eight workers take ~40 s on a 16-core host to spawn, import and fill their buffers (measured on
    an H200 host: 72% of the first 50-step window waited for data, after the compile); a restart
    that loads the compiled step in 5 s would spend most of its start there. One batch is drawn in a
    background thread, then the iterator is rewound to where it was (the workers reset, warm), so the
    batches the loop sees do not change. A failure in that draw is raised here, after the block.
    """
    if not enabled:
        yield
        return
    before, raised = host_iter.get_state(), []

    def draw():
        try:
            next(host_iter)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below.
            raised.append(e)

    thread = threading.Thread(target=draw, name="data-workers-start", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()
    if raised:
        raise raised[0]
    host_iter.set_state(before)


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


def _start_sums(metrics: dict) -> dict:
    bad = metrics["finite"] == 0
    return {"sums": {k: jnp.mean(v) for k, v in metrics.items()}, "count": jnp.int32(1),
            "first_bad": jnp.where(bad, 0, -1).astype(jnp.int32)}


def _add_to_sums(sums: dict, metrics: dict) -> dict:
    bad = (metrics["finite"] == 0) & (sums["first_bad"] < 0)
    return {"sums": {k: s + jnp.mean(metrics[k]) for k, s in sums["sums"].items()},
            "count": sums["count"] + 1,
            "first_bad": jnp.where(bad, sums["count"], sums["first_bad"])}


class MetricSums:
    """Running sums of the step's scalar metrics on the device, plus the first non-finite step.

    `add` is one jitted dispatch per step (the old per-step clu Collection merge dispatched tens of
    tiny ops); nothing is copied to the host until `means` or `first_nonfinite`.
    """

    _start = staticmethod(jax.jit(_start_sums))
    _add = staticmethod(jax.jit(_add_to_sums, donate_argnums=(0,)))

    def __init__(self):
        self._sums = None

    def add(self, metrics: dict) -> None:
        self._sums = self._start(metrics) if self._sums is None else self._add(self._sums, metrics)

    def first_nonfinite(self) -> int | None:
        """0-based index (since the last reset) of the first step whose loss or grads were not
        finite, or None. Blocks on the device."""
        if self._sums is None:
            return None
        first = int(jax.device_get(self._sums["first_bad"]))
        return None if first < 0 else first

    def means(self) -> dict[str, float]:
        """Per-metric means since the last reset (blocks on the device), then resets."""
        host = jax.device_get(self._sums)
        self._sums = None
        return {k: float(v) / int(host["count"]) for k, v in host["sums"].items()}


class Clock:
    """Splits a window's wall time: waiting for the input iterator, waiting for the device, host.

    `data_wait_frac`: the loop blocked in next(batches) (the input pipeline is too slow).
    `device_wait_frac`: the loop blocked in the step call (dispatch, and the device queue being full)
    or in copying metrics back at a log step: the accelerator is the bottleneck, as it should be.
    `host_frac`: everything else (bookkeeping, checkpoint saves, samples, logging): time in which
    the device may starve unless enough work is queued.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._start = time.perf_counter()
        self.waits = {"data": 0.0, "device": 0.0}

    def wait(self, kind: str) -> _Wait:
        return _Wait(self.waits, kind)

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def fractions(self) -> dict[str, float]:
        total = max(self.elapsed(), 1e-9)
        data, device = self.waits["data"] / total, self.waits["device"] / total
        return dict(data_wait_frac=data, device_wait_frac=device, host_frac=max(0.0, 1.0 - data - device))


class _Wait:
    __slots__ = ("waits", "kind", "start")

    def __init__(self, waits: dict, kind: str):
        self.waits, self.kind = waits, kind

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc_info):
        self.waits[self.kind] += time.perf_counter() - self.start


def throughput(steps: int, seconds: float, batch_size: int, flops_per_step: float, peak) -> dict:
    steps_per_s = steps / max(seconds, 1e-9)
    tflops = steps_per_s * flops_per_step / jax.device_count() / 1e12
    return dict(steps_per_s=steps_per_s, examples_per_s=steps_per_s * batch_size,
                tflops_per_device=tflops, mfu=tflops * 1e12 / peak if peak else None)
