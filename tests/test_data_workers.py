"""data.worker_count: -1 (the default) picks the loader's worker processes from the clip size and the host."""

import pytest

from configs import demo, kinetics, shapes
from eflow_jax.data import pipeline


def _data(**fields):
    cfg = pipeline.default_data_config()
    cfg.update(fields)
    return cfg


def test_auto_is_the_default_and_follows_cores_and_clip_size():
    assert pipeline.default_data_config().worker_count == pipeline.AUTO_WORKERS == -1
    big = _data(source="arrayrecord", num_frames=16, resolution=128)  # 768 KiB clips
    assert [pipeline.worker_count(big, cores=n) for n in (1, 2, 3, 6, 10, 64)] == [0, 0, 1, 4, 8, 8]
    small = _data(num_frames=4, resolution=16)  # 3 KiB: in-process on any host
    assert pipeline.worker_count(_data(num_frames=16, resolution=32), cores=16) == 8  # 48 KiB (shapes.py)
    assert pipeline.worker_count(small, cores=64) == 0
    latents = _data(source="latents", num_frames=5, resolution=32, channels=16)  # float32: 320 KiB
    assert pipeline.worker_count(latents, cores=16) == 8
    assert pipeline.worker_count(big) == min(8, max(0, len(__import__("os").sched_getaffinity(0)) - 2))


def test_explicit_counts_are_kept_and_bad_ones_refused():
    for n in (0, 1, 3, 8, 32):
        assert pipeline.worker_count(_data(worker_count=n, num_frames=16, resolution=128), cores=64) == n
    with pytest.raises(ValueError, match="worker_count=-2"):
        pipeline.worker_count(_data(worker_count=-2))


def test_shipped_configs_demo_and_tests_stay_in_process():
    # The demo and the shape the tests train on: no worker processes, however many cores.
    for arg in ("", "test=1", "size=32"):
        assert pipeline.worker_count(demo.get_config(arg).data, cores=128) == 0
    assert pipeline.worker_count(kinetics.get_config("runlocal=1").data, cores=128) == 0
    # Configs that set a count keep it.
    assert pipeline.worker_count(kinetics.get_config().data, cores=2) == 8
    assert pipeline.worker_count(shapes.get_config().data, cores=2) == 6
