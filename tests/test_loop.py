"""The loop's helpers: device prefetch keeps checkpoints exact, on-device metric sums, bench == CLI program."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from eflow_jax import loop, train
from eflow_jax.bench import train as bench_train
from eflow_jax.data import pipeline

TEST_CONFIG = "objective=flow_matching,test=1,batch=16"


def _data_cfg():
    return demo.get_config(TEST_CONFIG).data


def test_prefetcher_state_is_the_consumed_position_and_batches_are_uint8():
    raw = pipeline.make_train_iterator(_data_cfg(), global_batch_size=4, seed=3, float_video=False)
    batches = loop.DevicePrefetcher(raw, jax.device_put, size=2)
    got = [next(batches) for _ in range(3)]
    # The thread has read ahead by now; the state must still point after batch 3.
    reference = pipeline.make_train_iterator(_data_cfg(), global_batch_size=4, seed=3, float_video=False)
    expected = [next(reference) for _ in range(3)]
    assert json.loads(batches.get_state()) == reference.get_state()
    for g, e in zip(got, expected, strict=True):
        assert isinstance(g["video"], jax.Array) and g["video"].dtype == jnp.uint8
        np.testing.assert_array_equal(np.asarray(g["video"]), e["video"])
    # Resuming from that state continues with batch 4.
    resumed = pipeline.make_train_iterator(_data_cfg(), global_batch_size=4, seed=3, float_video=False)
    resumed.set_state(json.loads(batches.get_state()))
    np.testing.assert_array_equal(next(resumed)["video"], next(reference)["video"])
    batches.close()


def test_prefetcher_raises_the_producer_error_in_the_consumer():
    def broken():
        yield {"video": np.zeros(2)}
        raise RuntimeError("decoder exploded")

    class Iter:  # The two methods the prefetcher uses of a grain iterator.
        def __init__(self):
            self._it = broken()

        def __next__(self):
            return next(self._it)

        def get_state(self):
            return {}

    batches = loop.DevicePrefetcher(Iter(), lambda b: b)
    next(batches)
    with pytest.raises(RuntimeError, match="decoder exploded"):
        next(batches)


def test_metric_sums_mean_and_first_nonfinite_step():
    sums = loop.MetricSums()
    for loss, finite in [(1.0, 1.0), (3.0, 1.0), (np.nan, 0.0), (5.0, 0.0)]:
        sums.add({"loss": jnp.float32(loss), "finite": jnp.float32(finite)})
    assert sums.first_nonfinite() == 2
    means = sums.means()
    assert np.isnan(means["loss"]) and means["finite"] == 0.5
    for loss in (2.0, 4.0):
        sums.add({"loss": jnp.float32(loss), "finite": jnp.float32(1.0)})
    assert sums.first_nonfinite() is None and sums.means() == {"loss": 3.0, "finite": 1.0}


def test_uint8_pixels_become_model_input_on_device():
    pixels = np.array([0, 128, 255], np.uint8)
    np.testing.assert_allclose(train.to_model_input(jnp.asarray(pixels)), pixels / 127.5 - 1, atol=1e-6)
    assert train.to_model_input(jnp.ones(2, jnp.float16)).dtype == jnp.float32


def test_bench_times_the_program_the_cli_runs(tmp_path, monkeypatch):
    programs = []
    setup = train.setup
    monkeypatch.setattr(train, "setup", lambda c: programs.append(setup(c)) or programs[-1])
    c = demo.get_config(f"steps=1,{TEST_CONFIG}")
    c.train.compile_cache_dir = ""  # Both compile fresh: a cache hit's text can differ from a fresh compile's.
    train.train_and_evaluate(c, str(tmp_path))
    bench_train.time_train_step(c, iters=1)
    assert len(programs) == 2
    cli_hlo, bench_hlo = (_without_debug_info(p.step.as_text()) for p in programs)
    assert "input_output_alias" in cli_hlo  # The state is donated.
    assert cli_hlo == bench_hlo


def _without_debug_info(hlo: str) -> str:
    """The program without source locations, which name the caller's file (bench vs CLI)."""
    hlo = re.sub(r"\nFileNames\n.*?\n\n\n", "\n", hlo, flags=re.S)  # File/function/frame tables.
    return re.sub(r", metadata=\{[^}]*\}", "", hlo)


class _CountingIter:
    def __init__(self, fail: bool = False):
        self.position, self.fail, self.restored = 0, fail, []

    def __next__(self):
        if self.fail:
            raise RuntimeError("bad record")
        self.position += 1
        return self.position

    def get_state(self):
        return {"next_index": self.position}

    def set_state(self, state):
        self.restored.append(state)
        self.position = state["next_index"]


def test_workers_started_early_leave_the_position_unchanged_and_raise_data_errors():
    it = _CountingIter()
    with loop.workers_started_early(it):
        pass
    assert it.restored == [{"next_index": 0}] and next(it) == 1  # The warm-up draw is rewound.
    with pytest.raises(RuntimeError, match="bad record"):
        with loop.workers_started_early(_CountingIter(fail=True)):
            pass
    idle = _CountingIter()
    with loop.workers_started_early(idle, enabled=False):
        pass
    assert idle.restored == [] and idle.position == 0


def test_data_workers_run_during_the_block_and_batches_do_not_change():
    import multiprocessing
    import time

    cfg = _data_cfg()
    cfg.update(worker_count=2, random_flip=True)
    want = pipeline.make_train_iterator(cfg, global_batch_size=4, seed=1, float_video=False)
    want_batches = [next(want)["video"] for _ in range(3)]
    want.close()
    it = pipeline.make_train_iterator(cfg, global_batch_size=4, seed=1, float_video=False)
    before = len(multiprocessing.active_children())
    with loop.workers_started_early(it):
        deadline = time.monotonic() + 60
        while len(multiprocessing.active_children()) < before + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(multiprocessing.active_children()) >= before + 2, "no data worker started in the block"
    got = [next(it)["video"] for _ in range(3)]
    it.close()
    for w, g in zip(want_batches, got, strict=True):
        np.testing.assert_array_equal(g, w)
