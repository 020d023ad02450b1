"""Sampling from a trained run: mesh independence, export round trip, video files, the CLI.

One tiny run trains once per module (4 steps, params FSDP-sharded over all 8 devices) and every
test samples from its checkpoint. The run uses the flow-matching objective because its train step
compiles ~4x faster than EFlow's on CPU; the network (and so the checkpoint) is the same for every
objective, and the few-step samplers are exercised by sampling with an 'eflow' config view.
"""

import copy
import json
import os
import subprocess
import sys

import av
import jax
import ml_collections
import numpy as np
import pytest
from toy_networks import make_linear_network

from configs import demo
from eflow_jax import checkpoint, evaluate, progress, rundir, sample, sharding, train
from eflow_jax.models import dit

VIDEO_SHAPE = (4, 16, 16, 3)
NUM_SAMPLES = 8


# ---- one sampling path (a cheap analytic network in place of the DiT) ----


def toy_config(objective: str):
    return ml_collections.ConfigDict(dict(model=dict(video_shape=(2,), num_classes=3),
                                          objective=dict(name=objective), sample=sample.sample_config()))


@pytest.mark.parametrize("objective", ["eflow", "flow_matching"])  # renoise (3 steps: fresh noise), euler
def test_a_seed_gives_the_same_clips_whatever_the_batching_and_path(objective):
    config = toy_config(objective)
    net, params = make_linear_network(2, 3)
    mesh = sharding.make_mesh(sharding.mesh_config(), devices=jax.devices()[:1])
    labels = sample.parse_labels("", 10, 3)
    by_10 = sample.generate(config, net, params, labels, 3, 7, 10)
    by_3 = sample.generate(config, net, params, labels, 3, 7, 3)  # Batches 3+3+3+1 (padded).
    np.testing.assert_allclose(by_3, by_10, rtol=1e-6, atol=1e-6)
    # FVD generates through the same path: the same clips for the same seed.
    for_fvd = np.concatenate(list(evaluate.generate_batches(config, net, params, mesh, num_clips=10,
                                                            num_steps=3, seed=7, batch_size=4)))
    np.testing.assert_allclose(for_fvd, by_10, rtol=1e-6, atol=1e-6)
    # A prefix of the clips is the same clips; another seed gives other clips.
    np.testing.assert_allclose(sample.generate(config, net, params, labels[:4], 3, 7, 4), by_10[:4],
                               rtol=1e-6, atol=1e-6)
    assert np.abs(sample.generate(config, net, params, labels, 3, 8, 10) - by_10).min() > 1e-4


def test_generation_logs_clips_rate_and_eta():
    config = toy_config("eflow")
    net, params = make_linear_network(2, 3)
    lines = []
    sample.generate(config, net, params, [0, 1, 2, 0, 1], 2, 0, 2, log=lines.append)
    assert lines[0].startswith("sampling: 2/5 clips (40%) | ") and "clips/s | ETA " in lines[0]
    assert lines[-1].startswith("sampling: 5/5 clips (100%)") and lines[-1].endswith("ETA 0s")


def test_progress_format_and_throttle():
    assert progress.format_progress("FVD", 0, 50, 0.0) == "FVD: 0/50 clips (0%)"
    assert progress.format_progress("FVD", 10, 50, 5.0) == "FVD: 10/50 clips (20%) | 2.00 clips/s | ETA 20s"
    now, lines = [0.0], []
    p = progress.Progress("x", 4, log=lines.append, every_s=10, clock=lambda: now[0])
    for t in (1.0, 2.0, 15.0, 16.0):  # Logged: the first, after 10 s, and the last.
        now[0] = t
        p.update(1)
    assert [line.split(" (")[0] for line in lines] == ["x: 1/4 clips", "x: 3/4 clips", "x: 4/4 clips"]


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
    return dit.make_network(rundir.read_config(run_dir).model)[1]


def few_step_view(config):
    """The run's config with a solution-flow objective name: make_sample_fn then picks `renoise`."""
    view = copy.deepcopy(config)
    view.objective.name = "eflow"
    return view


def _generate(config, net, params, mesh, num_steps=2, seed=3):
    labels = sample.parse_labels("", NUM_SAMPLES, config.model.num_classes)
    return sample.generate(config, net, params, labels, num_steps, seed, NUM_SAMPLES, None, mesh)


def test_sampling_is_the_same_on_one_device_and_a_2x4_mesh(run_dir, net):
    config = few_step_view(rundir.read_config(run_dir))
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
    config = rundir.read_config(out)
    assert config.to_dict() == rundir.read_config(run_dir).to_dict()
    from_export = sample.load_params(out, config, mesh)
    abstract = sample.abstract_params(config, mesh)
    ema = checkpoint.restore_params(rundir.ckpt_dir(run_dir), abstract, which="ema")
    raw = checkpoint.restore_params(rundir.ckpt_dir(run_dir), abstract, which="params")
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


def test_cli_sample_mode_writes_a_file_per_clip(run_dir, tmp_path):
    # Labels repeat (1, 3, 1): every clip still gets its own files, and the log counts what exists.
    out = tmp_path / "cli"
    argv = [sys.executable, "-m", "eflow_jax.main", "--mode=sample", f"--workdir={run_dir}",
            f"--out={out}", "--sample.num_steps=2", "--sample.labels=1,3", "--sample.num=3",
            "--sample.batch_size=2", "--sample.seed=5", "--sample.fps=6"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo)
    if jax.config.jax_compilation_cache_dir:  # Share the suite's compilation cache, if any.
        env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    done = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    names = sorted(os.listdir(out))
    # Every name says which training step's params made it (the run's latest checkpoint: step 4).
    stems = ["clip00000_label0001_seed5_steps2_trainstep4", "clip00001_label0003_seed5_steps2_trainstep4",
             "clip00002_label0001_seed5_steps2_trainstep4"]
    expected = ["grid_steps2_trainstep4.gif", "grid_steps2_trainstep4.mp4", "samples.json"] + [
        f"{s}.{e}" for s in stems for e in ("gif", "mp4")]
    assert names == sorted(expected)
    assert f"wrote {len(names) - 1} files" in done.stderr
    assert json.loads((out / "samples.json").read_text()) | {"run": ""} == dict(
        kind="sample", run="", step=4, params="ema", sampler="euler", num_steps=2, seed=5, fps=6, num=3,
        guidance="cfg", guidance_scale=3.0, labels="1,3")
    assert "sampling: 3/3 clips (100%)" in done.stderr and "writing videos: 3/3 clips" in done.stderr
    t, h, w, _ = VIDEO_SHAPE
    clips = []
    for stem in stems:
        mp4, rate = _decode(out / f"{stem}.mp4")
        gif, _ = _decode(out / f"{stem}.gif")
        assert mp4.shape == gif.shape == (t, h, w, 3)
        assert rate == 6
        assert mp4.std() > 5 and gif.std() > 5  # A sample (noise-like after 4 steps), not blank.
        clips.append(mp4.astype(int))
    assert np.abs(clips[0] - clips[1]).mean() > 10 and np.abs(clips[0] - clips[2]).mean() > 10  # All differ.
    grid, _ = _decode(out / "grid_steps2_trainstep4.mp4")
    assert grid.shape[0] == t and grid.shape[2] > 2 * w  # Clips side by side.
