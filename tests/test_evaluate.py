"""FVD evaluation of a run: eval.json, protocol, real-statistics cache, decoder hook, clear errors.

The run is a tiny EFlow model with random weights, saved by the training Checkpointer in the
layout a run writes (training itself is covered by test_sample and would add a minute of
compiling here). I3D has random weights made here and runs at a small resolution, which the
protocol states.
"""

import json
import os
import re

import jax
import numpy as np
import pytest

from configs import demo
from eflow_jax import checkpoint, evaluate, sample, sharding
from eflow_jax.data import pipeline
from eflow_jax.eval import fvd, i3d

NUM_CLIPS = 16
BATCH = 8


def _random_i3d_file(path):
    # He-scaled kernels and a non-trivial folded batch norm keep activations O(1) to the logits.
    rng = np.random.default_rng(0)
    flat = {}
    for key, shape in i3d.expected_param_shapes().items():
        if key.endswith("kernel"):
            flat[key] = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        elif key.endswith("scale"):
            flat[key] = rng.uniform(0.8, 1.2, size=shape)
        else:
            flat[key] = rng.normal(size=shape) * 0.1
    np.savez(path, **{k: v.astype(np.float32) for k, v in flat.items()})
    return str(path)


def eval_config(i3d_path, stats_dir):
    c = demo.get_config("steps=10,batch=8")
    c.model.update(video_shape=(4, 16, 16, 3), patch=(1, 4, 4), tile=(2, 4, 4), cell=(1, 2, 2))
    c.data.update(num_frames=4, resolution=16, num_examples=64)
    c.eval.fvd.update(i3d_path=i3d_path, num_gen_clips=NUM_CLIPS, num_real_clips=NUM_CLIPS,
                      batch_size=BATCH, num_steps=1, seed=0, stats_dir=stats_dir)
    # 4-frame 16^2 clips: the protocol is pinned to the first 4 frames at 32^2 (and says so).
    c.eval.fvd.num_frames = 4
    c.eval.fvd.resolution = 32
    return c


def random_params(config, mesh, seed=0):
    """Random params built on the host, on one device (saving 8 replicas would cost ~8 s)."""
    rng = np.random.default_rng(seed)

    def leaf(path, abstract):
        name = jax.tree_util.keystr(path)
        if abstract.ndim >= 2:  # Kernels: ~unit-variance activations through the net.
            value = rng.normal(size=abstract.shape) / np.sqrt(np.prod(abstract.shape[:-1]))
        else:
            value = rng.normal(size=abstract.shape) * 0.05 + ("scale" in name)
        return jax.device_put(value.astype(abstract.dtype), jax.devices()[0])

    return jax.tree_util.tree_map_with_path(leaf, sample.abstract_params(config, mesh))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    config = eval_config(_random_i3d_file(root / "i3d.npz"), str(root / "stats"))
    workdir = str(root / "run")
    mesh = sharding.make_mesh(config.mesh)
    # The checkpoint layout a training run writes (Checkpointer, config.json); only the fields
    # evaluation reads are filled, with random weights (training is covered by test_sample).
    params = random_params(config, mesh)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "ckpt"), save_every=1, async_save=False)
    ckpt.save(7, {"step": np.int32(7), "params": params, "ema_params": params}, force=True)
    ckpt.close()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json())
    return config, workdir, mesh


def test_errors_name_the_fix_before_any_work(setup, tmp_path):
    config, workdir, mesh = setup
    bad = config.copy_and_resolve_references()
    bad.eval.fvd.i3d_path = ""
    with pytest.raises(ValueError, match="eflow_jax.eval.convert_i3d"):
        evaluate.run_fvd(bad, workdir, str(tmp_path), mesh)
    bad.eval.fvd.i3d_path = str(tmp_path / "absent.npz")
    with pytest.raises(FileNotFoundError, match="eflow_jax.eval.convert_i3d"):
        evaluate.run_fvd(bad, workdir, str(tmp_path), mesh)
    latent = config.copy_and_resolve_references()
    latent.model.video_shape = (4, 16, 16, 4)
    with pytest.raises(ValueError, match="decoder="):
        evaluate.run_fvd(latent, workdir, str(tmp_path), mesh)
    assert not os.listdir(tmp_path)


def test_fvd_writes_eval_json_and_reuses_cached_real_stats(setup, tmp_path, monkeypatch, capsys):
    config, workdir, mesh = setup
    config = config.copy_and_resolve_references()
    config.eval.fvd.stats_dir = str(tmp_path / "stats")  # Fresh: this test computes them first.
    out = tmp_path / "eval"
    result = evaluate.run_fvd(config, workdir, str(out), mesh)

    saved = json.loads((out / "eval.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert np.isfinite(saved["fvd"]) and saved["fvd"] > 0
    assert (saved["checkpoint_step"], saved["num_steps"], saved["sampler"]) == (7, 1, "renoise")
    assert saved["num_gen_clips"] == saved["num_real_clips"] == NUM_CLIPS
    assert saved["real_stats_cached"] is False
    protocol = saved["protocol"]
    assert protocol["frames"] == "first 4" and protocol["resize"].startswith("32x32 bilinear")
    assert protocol["i3d_weights_sha256"] == i3d.weights_sha256(config.eval.fvd.i3d_path)
    assert protocol["real_source"] == "synthetic_moving_shapes"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out))
    printed = capsys.readouterr().out
    assert f"FVD {saved['fvd']:.2f}" in printed and fvd.format_protocol(protocol) in printed

    stats_path = saved["real_stats"]
    assert os.path.dirname(stats_path) == config.eval.fvd.stats_dir
    name = os.path.basename(stats_path)
    assert name.startswith("fvd_real_synthetic_moving_shapes_train_n16_f4_r32_")
    mu, sigma = fvd.load_stats(stats_path, expect_protocol=protocol)  # Stamped with the protocol.
    assert mu.shape == (i3d.I3D_FEATURE_DIM,) and sigma.shape == (400, 400)
    mtime = os.stat(stats_path).st_mtime_ns

    def no_real_data(*args, **kwargs):
        raise AssertionError("real statistics were recomputed instead of read from the cache")

    monkeypatch.setattr(pipeline, "make_eval_iterator", no_real_data)
    again = evaluate.run_fvd(config, workdir, str(tmp_path / "again"), mesh)
    assert again["real_stats_cached"] is True and again["real_stats"] == stats_path
    assert os.stat(stats_path).st_mtime_ns == mtime
    assert again["fvd"] == saved["fvd"]  # Same seed, same clips, same number.


def test_fvd_is_zero_when_the_decoder_returns_the_real_clips(setup, tmp_path):
    # Closed form: identical feature sets give mu_1 = mu_2 and S_1 = S_2, so FVD = 0. This runs
    # the generated side through exactly the pipeline the real side took (batches, padding,
    # quantise, resize, I3D on the mesh, streaming statistics).
    config, workdir, mesh = setup
    real = [b["video"] for b in pipeline.make_eval_iterator(config.data, batch_size=BATCH,
                                                             num_examples=NUM_CLIPS)]
    seen = []

    def decoder(videos):
        seen.append(videos.shape)
        return real[len(seen) - 1]

    result = evaluate.run_fvd(config, workdir, str(tmp_path), mesh, decoder=decoder)
    assert seen == [(BATCH, 4, 16, 16, 3)] * (NUM_CLIPS // BATCH)
    _, sigma = fvd.load_stats(result["real_stats"])
    assert abs(result["fvd"]) < 1e-9 * np.trace(sigma)


def test_convert_hint_names_a_flag_eval_mode_accepts():
    # --mode=eval reads the run's config.json (no --config), so only --eval.* overrides reach it:
    # a hint saying --config.eval.fvd.i3d_path=... is rejected as an unknown flag.
    from eflow_jax import main

    flag = re.search(r"then pass --([\w.]+)=", evaluate.CONVERT_HINT).group(1)
    name, *path = flag.split(".")
    assert name in main.FLAGS and name != "config", flag
    value = main.FLAGS[name].value
    for key in path:
        value = value[key]
