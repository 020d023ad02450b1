"""Where metrics go: TensorBoard events (tensorboardX, no TensorFlow needed) and metrics.jsonl.

Only process 0 writes; every other process gets a writer that drops everything, so the loop
calls it unconditionally. clu's metric writers import TensorFlow (every writer), hence
tensorboardX for the events.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import logging

# Dense bf16 peak per chip, for MFU. Unknown chips report MFU as null.
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12,
}


def peak_flops_per_device() -> float | None:
    kind = getattr(jax.devices()[0], "device_kind", "")
    return next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), None)


class MetricWriter:
    """Scalars to TensorBoard + metrics.jsonl, images/videos to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            from eflow_jax import rundir

            self._tb = SummaryWriter(rundir.tb_dir(workdir), flush_secs=10)
            self._jsonl = open(rundir.metrics_path(workdir), "a")  # noqa: SIM115

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None}
        for k, v in clean.items():
            self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()

    def video_strip(self, step: int, tag: str, strip_hwc: np.ndarray) -> None:
        """An image strip of video frames in [-1, 1] ([H, W*k, C])."""
        if self.enabled:
            img = np.clip((strip_hwc[..., :3] + 1) * 127.5, 0, 255).astype(np.uint8)
            self._tb.add_image(tag, img, step, dataformats="HWC")

    def text(self, tag: str, text: str) -> None:
        if self.enabled:
            self._tb.add_text(tag, text, 0)

    def close(self) -> None:
        """Flushes and closes; a failed flush (disk full) is one warning, so it cannot hide the error
        that ended the run (close runs in the train loop's `finally`)."""
        if not self.enabled:
            return
        try:
            self._tb.close()
        except OSError as e:
            logging.warning("could not flush the TensorBoard events in %s: %s", self._tb.logdir, e)
            _give_up_events(self._tb)
        finally:
            self._jsonl.close()


def _give_up_events(tb) -> None:
    """After a failed flush: stops tensorboardX's writer threads and marks its files closed, so its atexit
    hook does not flush again and print a traceback under the run's error line (tensorboardX internals:
    best effort)."""
    for file_writer in list((getattr(tb, "all_writers", None) or {}).values()):
        events = getattr(file_writer, "event_writer", None)
        worker = getattr(events, "_worker", None)
        if worker is not None and worker.is_alive():
            events._event_queue.put(worker._shutdown_signal)
            worker.join(timeout=10)
        if events is not None:
            events._closed = True
    tb.file_writer = tb.all_writers = None
