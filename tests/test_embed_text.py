"""embed_text: captions of a prepared dataset -> text embeddings by record index; the sources' join."""

import json
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from eflow_jax.data import embed_text, prepare, sources
from eflow_jax.models import t5

CAPTIONS = [f"a {color} {shape} moving {way}" for color in ("red", "green", "blue") for shape in ("circle", "square")
            for way in ("left", "right", "up")]  # 18 clips.
CAPTIONS[5] = " ".join(["a very long caption that goes on"] * 6)  # Longer than max_len: truncated.
MAX_LEN = 40  # The tiny tokenizer is nearly per character: ~25 tokens per caption.


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return t5.write_random_encoder(tmp_path_factory.mktemp("enc"), CAPTIONS, d_model=16, num_layers=2, num_heads=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """18 captioned clips in shards of 4 (what `prepare` makes from caption annotations)."""
    out = tmp_path_factory.mktemp("clips")
    clips = np.random.default_rng(0).integers(0, 255, (len(CAPTIONS), 2, 8, 8, 3), dtype=np.uint8)
    prepare.write_clips(out, [{"video": v, "label": 0, "caption": c} for v, c in zip(clips, CAPTIONS, strict=True)],
                        settings=prepare.PrepareSettings(frames=2, size=8, codec="raw"), classes=[],
                        examples_per_shard=4)
    return out


def _embed(encoder_dir, data, out, **kwargs):
    lines = []
    kwargs = dict(dict(max_len=MAX_LEN, batch_size=4, records_per_shard=5), **kwargs)
    manifest = embed_text.embed_dataset(str(encoder_dir), str(data), out and str(out), log=lines.append, **kwargs)
    return manifest, lines


def test_end_to_end_resume_and_refusals(encoder_dir, dataset, tmp_path):
    out = tmp_path / "text"
    manifest, lines = _embed(encoder_dir, dataset, out)
    assert manifest["num_examples"] == 18 and len(manifest["shards"]) == 4  # 5 + 5 + 5 + 3 records.
    assert manifest["num_truncated"] == 1 and manifest["truncated"] == [5]
    assert manifest["num_empty"] == manifest["num_bad"] == 0 and manifest["d_model"] == 16
    assert manifest["encoder"]["digest"] == t5.checkpoint_digest(t5.find_encoder_files(encoder_dir))
    assert "captions/s" in lines[-2] and "1 truncated to 40 tokens" in lines[-1]

    # Aligned by record index, equal to encoding the captions directly (bf16 storage of the same numbers).
    text = sources.TextEmbeddings(out)
    encoder = t5.TextEncoder.load(encoder_dir, max_len=MAX_LEN)
    want, want_mask = encoder.encode(CAPTIONS)
    assert len(text) == 18
    for i in range(18):
        got = text[i]
        assert got["text_embedding"].dtype == ml_dtypes.bfloat16 and got["text_embedding"].shape == (MAX_LEN, 16)
        np.testing.assert_array_equal(got["text_mask"], want_mask[i])
        np.testing.assert_array_equal(got["text_embedding"], want[i])
    # Storage keeps only the text's rows: the short captions' records are smaller than L x D x 2 bytes.
    raw = sources.unpack_record(text._records[0])
    assert raw["text_embedding"].shape == (int(want_mask[0].sum()), 16) < (MAX_LEN, 16)

    # Resume: shard 2's done mark is gone -> only it is redone, byte-identical.
    shard = out / "text-00002-of-00004.array_record"
    before = shard.read_bytes()
    (out / (shard.name + ".done.json")).unlink()
    (out / "manifest.json").unlink()
    again, lines = _embed(encoder_dir, dataset, out)
    assert "(3 already done)" in lines[0] and again == manifest and shard.read_bytes() == before
    _, lines = _embed(encoder_dir, dataset, out)  # All done: nothing is loaded or encoded.
    assert "(4 already done)" in lines[0] and len(lines) == 2

    # Another encoder or max_len into the same --out: one clear line, nothing touched.
    other = t5.write_random_encoder(tmp_path / "other", CAPTIONS, d_model=16, num_layers=2, num_heads=2, seed=1)
    with pytest.raises(ValueError, match="holds text embeddings made with other settings \\(encoder"):
        _embed(other, dataset, out)
    with pytest.raises(ValueError, match="other settings \\(max_len 40 -> 16\\)"):
        _embed(encoder_dir, dataset, out, max_len=16)
    with pytest.raises(SystemExit, match="^\\[embed_text\\] .*other settings.*") as info:
        embed_text.main([f"--encoder={other}", f"--data={dataset}", f"--out={out}", "--max_len=40"])
    assert "\n" not in str(info.value.code)
    assert shard.read_bytes() == before


def test_source_join(encoder_dir, dataset, tmp_path):
    out = tmp_path / "text"
    _embed(encoder_dir, dataset, out)
    plain = sources.ArrayRecordClipSource(dataset)
    joined = sources.ArrayRecordClipSource(dataset, text_dir=out)
    text = sources.TextEmbeddings(out)
    for i in (0, 5, 17):
        example = joined[i]
        assert set(example) == {"video", "label", "caption", "text_embedding", "text_mask"}
        assert example["caption"] == CAPTIONS[i]
        np.testing.assert_array_equal(example["video"], plain[i]["video"])
        np.testing.assert_array_equal(example["text_embedding"], text[i]["text_embedding"])
    # Text embeddings of another dataset (another count, or the same count in another record order) are refused.
    smaller = tmp_path / "smaller"
    prepare.write_clips(smaller, [{"video": plain[i]["video"], "label": 0, "caption": CAPTIONS[i]} for i in range(3)],
                        settings=prepare.PrepareSettings(frames=2, size=8, codec="raw"), classes=[])
    with pytest.raises(ValueError, match="hold 18 records but dataset .* has 3"):
        sources.ArrayRecordClipSource(smaller, text_dir=out)
    reordered = tmp_path / "reordered"
    shutil.copytree(dataset, reordered)
    manifest = json.loads((reordered / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][::-1]
    (reordered / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="another preparation"):
        sources.ArrayRecordClipSource(reordered, text_dir=out)
    with pytest.raises(FileNotFoundError, match="manifest.json is missing: text embedding never ran"):
        sources.ArrayRecordClipSource(dataset, text_dir=tmp_path / "nowhere")


def test_latents_with_captions_empty_and_bad(encoder_dir, tmp_path):
    """Latent records carrying captions (write_latents); empty ones are embedded as "" and counted."""
    latents = tmp_path / "latents"
    captions = ["a red circle", "", "   ", "a blue square moving right", "x\udcff"]
    examples = [{"latent": np.full((1, 2, 2, 4), i, np.float16), "caption": c} for i, c in enumerate(captions)]
    assert sources.write_latents(latents, examples, examples_per_shard=2)["captioned"] is True
    manifest, lines = _embed(encoder_dir, latents, tmp_path / "text", records_per_shard=3)
    assert (manifest["num_empty"], manifest["empty"], manifest["num_bad"], manifest["bad"]) == (2, [1, 2], 1, [4])
    assert "2 empty and 1 unreadable embedded as" in lines[-1]
    source = sources.LatentSource(latents, text_dir=tmp_path / "text")
    encoder = t5.TextEncoder.load(encoder_dir, max_len=MAX_LEN)
    null, null_mask = encoder.encode([""])
    for i in (1, 2, 4):
        np.testing.assert_array_equal(source[i]["text_embedding"], null[0])
        assert source[i]["text_mask"].sum() == 1 == null_mask.sum()
    assert source[3]["caption"] == "a blue square moving right" and source[3]["video"].dtype == np.float16
    # The .npy latents layout joins by index too.
    npy = tmp_path / "npy"
    npy.mkdir()
    np.save(npy / "latents.npy", np.zeros((5, 1, 2, 2, 4), np.float32))
    np.testing.assert_array_equal(sources.LatentSource(npy, text_dir=tmp_path / "text")[3]["text_mask"],
                                  source[3]["text_mask"])


def test_refuses_datasets_without_captions_and_broken_encoders(encoder_dir, tmp_path):
    labels = tmp_path / "labels"
    prepare.write_clips(labels, [{"video": np.zeros((2, 8, 8, 3), np.uint8), "label": 0}],
                        settings=prepare.PrepareSettings(frames=2, size=8, codec="raw"), classes=["a"])
    with pytest.raises(ValueError, match="is not captioned"):
        _embed(encoder_dir, labels, tmp_path / "out")
    dataset = tmp_path / "captioned"
    prepare.write_clips(dataset, [{"video": np.zeros((2, 8, 8, 3), np.uint8), "label": 0, "caption": "hi"}],
                        settings=prepare.PrepareSettings(frames=2, size=8, codec="raw"), classes=[])
    broken = tmp_path / "broken"
    shutil.copytree(encoder_dir, broken)
    (broken / "spiece.model").unlink()
    with pytest.raises(SystemExit, match="spiece.model is missing"):
        embed_text.main([f"--encoder={broken}", f"--data={dataset}"])
    assert not (dataset / "text_embeddings").exists()
    manifest, _ = _embed(encoder_dir, dataset, None)  # Default --out: DATA/text_embeddings.
    assert os.path.exists(dataset / "text_embeddings" / "manifest.json") and manifest["num_examples"] == 1


def test_float32_encoder_matches_stored_bfloat16(encoder_dir):
    """What is stored is the bfloat16 encoder's output; the float32 encoder is within bf16 rounding."""
    emb16, mask = t5.TextEncoder.load(encoder_dir, max_len=MAX_LEN).encode(CAPTIONS[:4])
    emb32, _ = t5.TextEncoder.load(encoder_dir, max_len=MAX_LEN, dtype=jnp.float32).encode(CAPTIONS[:4])
    scale = np.abs(emb32).max()
    assert np.abs(emb16.astype(np.float32) - emb32)[mask].max() < 0.1 * scale
