"""Sampling from a trained run: mesh independence, export round trip, video files, the CLI.

One tiny run trains once per module (4 steps, params FSDP-sharded over all 8 devices) and every
test samples from its checkpoint. The run uses the flow-matching objective because its train step
compiles ~4x faster than EFlow's on CPU; the network (and so the checkpoint) is the same for every
objective, and the few-step samplers are exercised by sampling with an 'eflow' config view.
"""

import copy
import os
import subprocess
import sys

import av
import jax
import numpy as np
import pytest

from configs import demo
from eflow_jax import checkpoint, sample, sharding, train
from eflow_jax.models import dit

VIDEO_SHAPE = (4, 16, 16, 3)
NUM_SAMPLES = 8


def tiny_config(steps: int = 4):
    c = demo.get_config(f"steps={steps},batch=8,objective=flow_matching")
    c.model.update(video_shape=VIDEO_SHAPE, patch=(1, 4, 4), tile=(2, 4, 4), cell=(1, 2, 2))
    c.data.update(num_frames=4, resolution=16, num_examples=64)
    c.mesh.ici.update(data=1, fsdp=8, tensor=1)  # Every 'embed' weight split 8 ways.
    c.checkpoint.update(save_every=steps, async_save=False)
    c.log.update(every_steps=steps, sample_steps=())  # No end-of-run samples: saves a compile.
    c.train.check_memory = False
    return c


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    state = train.train_and_evaluate(tiny_config(), workdir)
    # The training params really were sharded over the 8 devices.
    kernel = state.params["patch_embed"]["kernel"]
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    return workdir


@pytest.fixture(scope="module")
def net(run_dir):
    # One Network object for the module: make_sample_fn caches its jit per net, so every
    # generate() call below on an already-seen mesh reuses the compiled sampler.
    return dit.make_network(sample.load_run_config(run_dir).model)[1]


def few_step_view(config):
    """The run's config with a solution-flow objective name: make_sample_fn then picks `renoise`."""
    view = copy.deepcopy(config)
    view.objective.name = "eflow"
    return view


def _generate(config, net, params, mesh, num_steps=2, seed=3):
    labels = sample.parse_labels("", NUM_SAMPLES, config.model.num_classes)
    return sample.generate(config, net, params, labels, num_steps, seed, NUM_SAMPLES, None, mesh)


def test_sampling_is_the_same_on_one_device_and_a_2x4_mesh(run_dir, net):
    config = few_step_view(sample.load_run_config(run_dir))
    one = sharding.make_mesh(sharding.mesh_config(), devices=jax.devices()[:1])
    two_by_four = sharding.make_mesh(sharding.mesh_config(ici=dict(data=2, fsdp=4, tensor=1)))
    params_one = sample.load_params(run_dir, config, one)
    params_8 = sample.load_params(run_dir, config, two_by_four)
    kernel = params_8["patch_embed"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    # Same values, whatever the layout.
    for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_8), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    videos_one = _generate(config, net, params_one, one)
    videos_8 = _generate(config, net, params_8, two_by_four)
    assert videos_one.shape == (NUM_SAMPLES, *VIDEO_SHAPE) and videos_one.dtype == np.float32
    assert np.all(np.isfinite(videos_one))
    # FSDP splits the contraction over 'embed', so XLA sums partial products in another order:
    # equal up to float32 round-off (measured max |diff| 1.2e-7), not bitwise.
    np.testing.assert_allclose(videos_one, videos_8, rtol=1e-5, atol=1e-6)
    # The seed decides the samples: another seed gives other videos.
    other = _generate(config, net, params_one, one, seed=4)
    assert np.abs(other - videos_one).max() > 0.1


def test_export_then_load_samples_like_the_checkpoint(run_dir, net, tmp_path):
    mesh = sharding.make_mesh(sharding.mesh_config(), devices=jax.devices()[:1])
    out = sample.export(run_dir, str(tmp_path / "export"), mesh)
    config = sample.load_run_config(out)
    assert config.to_dict() == sample.load_run_config(run_dir).to_dict()
    from_export = sample.load_params(out, config, mesh)
    abstract = sample.abstract_params(config, mesh)
    ema = checkpoint.restore_params(os.path.join(run_dir, "ckpt"), abstract, which="ema")
    raw = checkpoint.restore_params(os.path.join(run_dir, "ckpt"), abstract, which="params")
    for a, b in zip(jax.tree.leaves(from_export), jax.tree.leaves(ema), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The export holds the EMA weights, not the raw ones (they differ after 4 updates).
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(raw), strict=True))
    assert diff > 0

    view = few_step_view(config)
    np.testing.assert_array_equal(_generate(view, net, from_export, mesh),
                                  _generate(view, net, ema, mesh))


def _decode(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        rate = stream.average_rate
    return np.stack(frames), rate


def test_cli_sample_mode_writes_decodable_videos(run_dir, tmp_path):
    out = tmp_path / "cli"
    argv = [sys.executable, "-m", "eflow_jax.main", "--mode=sample", f"--workdir={run_dir}",
            f"--out={out}", "--sample.num_steps=2", "--sample.labels=1,3", "--sample.num=2",
            "--sample.batch_size=8", "--sample.seed=5", "--sample.fps=6"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo)
    if jax.config.jax_compilation_cache_dir:  # Share the suite's compilation cache, if any.
        env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    done = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    names = sorted(os.listdir(out))
    assert names == ["grid_steps2.gif", "grid_steps2.mp4",
                     "label0001_seed5_steps2.gif", "label0001_seed5_steps2.mp4",
                     "label0003_seed5_steps2.gif", "label0003_seed5_steps2.mp4"]
    t, h, w, _ = VIDEO_SHAPE
    clips = {}
    for label in (1, 3):
        mp4, rate = _decode(out / f"label{label:04d}_seed5_steps2.mp4")
        gif, _ = _decode(out / f"label{label:04d}_seed5_steps2.gif")
        assert mp4.shape == gif.shape == (t, h, w, 3)
        assert rate == 6
        assert mp4.std() > 5 and gif.std() > 5  # A sample (noise-like after 4 steps), not blank.
        clips[label] = mp4
    assert np.abs(clips[1].astype(int) - clips[3].astype(int)).mean() > 10  # Two different samples.
    grid, _ = _decode(out / "grid_steps2.mp4")
    assert grid.shape[0] == t and grid.shape[2] > 2 * w  # Two clips side by side.
