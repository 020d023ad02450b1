"""The T5-family text encoder (models/t5.py) against transformers, on tiny random checkpoints."""

import json
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from eflow_jax.models import pretrained, t5

CORPUS = [
    "a small red circle moving left", "a big blue square moving right", "two green triangles bounce off the walls",
    "the camera pans slowly over a quiet lake at dawn", "a dog runs across the wet grass", "a man plays the guitar",
    "close-up of a woman smiling, soft light", "timelapse of clouds drifting over snowy mountains",
    "a yellow taxi drives through a busy street at night", "waves crash against the rocks in slow motion",
    "children playing football in the park", "a cat sleeps on a warm windowsill", "Ünïcödé café naïve résumé",
    "aerial view of a forest in autumn, orange and red leaves", "someone is cooking pasta in a small kitchen",
    "fireworks explode above the city skyline", "a red circle and a blue square move in opposite directions",
    "the purple triangle spins while moving up", "rain falls on a window, blurry lights behind",
] * 2
TEXTS = ["a small red circle moving left", "", "the camera pans over a quiet lake at dawn while a dog runs "
         "across the wet grass and fireworks explode above the city skyline in slow motion",
         "  two  green\ttriangles ", "Ünïcödé café 日本語 zzz", "a cat"]
MAX_LEN = 24  # > max_distance below: the logarithmic and the clamped buckets are both used.
SMALL = dict(vocab_size=None, d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=64,
             relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.0)
ERRORS = {}  # Architecture -> max abs error against transformers (printed at the end of the module).


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    """A SentencePiece model trained on CORPUS (T5 ids: pad 0, eos 1, unk 2)."""
    directory = t5.write_random_encoder(tmp_path_factory.mktemp("spm"), CORPUS, vocab_size=150)
    return os.path.join(directory, t5.TOKENIZER_FILE)


def test_tokenizer_matches_transformers(spiece, tmp_path):
    transformers = pytest.importorskip("transformers", reason="the reference tokenizer is not installed")
    shutil.copy(spiece, tmp_path / "spiece.model")
    reference = transformers.T5Tokenizer.from_pretrained(str(tmp_path))
    ours = t5.Tokenizer(spiece)
    for max_len in (MAX_LEN, 5, 1):
        tokens = ours(TEXTS, max_len)
        ref = reference(TEXTS, max_length=max_len, truncation=True, padding="max_length", return_tensors="np")
        np.testing.assert_array_equal(tokens.ids, ref["input_ids"])
        np.testing.assert_array_equal(tokens.mask, ref["attention_mask"].astype(bool))
        lengths = [len(reference(t).input_ids) for t in TEXTS]
        np.testing.assert_array_equal(tokens.truncated, np.array(lengths) > max_len)
    assert ours(TEXTS, MAX_LEN).truncated.tolist() == [False, False, True, False, False, False]
    assert ours([""], 4).ids.tolist() == [[1, 0, 0, 0]]  # Empty text: just the EOS.


def test_relative_buckets_match_transformers():
    modeling_t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    torch = pytest.importorskip("torch")
    for length, buckets, distance in [(300, 32, 128), (40, 8, 12), (7, 32, 128)]:
        offsets = torch.arange(length)[None, :] - torch.arange(length)[:, None]
        ref = modeling_t5.T5Attention._relative_position_bucket(offsets, True, buckets, distance).numpy()
        np.testing.assert_array_equal(t5.relative_position_buckets(length, buckets, distance), ref)


def _randomize(model, torch, seed):
    """Every weight random (norm scales too, so a wrongly mapped norm shows)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=generator))
            elif "relative_attention_bias" in name or name.endswith(("shared.weight", "embed_tokens.weight")):
                p.copy_(torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)


ARCHITECTURES = {
    # name: (config class, model class, feed_forward_proj, how it is saved)
    "t5-relu": ("T5Config", "T5Model", "relu", "full encoder-decoder"),
    "t5-gated-gelu": ("T5Config", "T5EncoderModel", "gated-gelu", "sharded"),
    "umt5": ("UMT5Config", "UMT5EncoderModel", "gated-gelu", "single file"),
}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_encoder_matches_transformers(arch, spiece, tmp_path):
    torch = pytest.importorskip("torch", reason="the reference implementation needs torch")
    transformers = pytest.importorskip("transformers", reason="the reference implementation is not installed")
    config_cls, model_cls, proj, saved = ARCHITECTURES[arch]
    tokenizer = t5.Tokenizer(spiece)
    config = getattr(transformers, config_cls)(**dict(SMALL, vocab_size=tokenizer.vocab_size + 5),
                                               feed_forward_proj=proj)
    model = getattr(transformers, model_cls)(config).eval()
    _randomize(model, torch, seed=len(arch))
    model.save_pretrained(str(tmp_path), safe_serialization=True,
                          **({"max_shard_size": "20KB"} if saved == "sharded" else {}))
    if saved == "sharded":
        assert (tmp_path / "model.safetensors.index.json").exists()
    shutil.copy(spiece, tmp_path / "spiece.model")

    encoder = t5.TextEncoder.load(tmp_path, max_len=MAX_LEN, dtype=jnp.float32, batch_size=4)
    assert encoder.config.bias_per_layer == (arch == "umt5") and encoder.config.gated == (proj != "relu")
    tokens = encoder.tokenize(TEXTS)
    assert tokens.mask.all(1).sum() == 1 and (~tokens.mask).any()  # One full (truncated) row, padded rows.
    encoder_module = model.encoder if hasattr(model, "encoder") else model
    with torch.no_grad():
        ref = encoder_module(input_ids=torch.tensor(tokens.ids, dtype=torch.long),
                             attention_mask=torch.tensor(tokens.mask, dtype=torch.long)).last_hidden_state.numpy()
    # Every position, padding rows included (they attend to the text, like the reference's).
    raw = np.asarray(encoder.module.apply({"params": encoder.params}, tokens.ids, tokens.mask))
    ERRORS[arch] = float(np.abs(raw - ref).max())
    print(f"\n{arch}: max |ours - transformers| over {raw.size} values = {ERRORS[arch]:.2e} "
          f"(output scale {np.abs(ref).max():.2f})")
    np.testing.assert_allclose(raw, ref, atol=1e-4, rtol=0)
    emb, mask = encoder.encode(TEXTS)  # Batched by 4: two calls, the second padded.
    np.testing.assert_array_equal(mask, tokens.mask)
    np.testing.assert_allclose(emb[mask], ref[mask], atol=1e-4, rtol=0)
    assert not emb[~mask].any()


def test_bfloat16_encode_is_close_and_compiles_once(tmp_path):
    directory = t5.write_random_encoder(tmp_path / "enc", CORPUS, d_model=32, num_layers=2)
    exact = t5.TextEncoder.load(directory, max_len=16, dtype=jnp.float32, batch_size=4)
    bf16 = t5.TextEncoder.load(directory, max_len=16, batch_size=4)
    emb, mask = bf16.encode(TEXTS)
    assert emb.dtype == ml_dtypes.bfloat16 and emb.shape == (6, 16, 32) and mask.dtype == bool
    assert (mask[:, 1:] <= mask[:, :-1]).all() and mask[:, 0].all()  # A prefix of Trues.
    want = exact.encode(TEXTS)[0]
    assert np.abs(emb.astype(np.float32) - want).max() < 0.1 * np.abs(want).max()
    # Batching does not change a text's embedding: one at a time gives the same rows.
    one = np.concatenate([exact.encode([t])[0] for t in TEXTS])
    np.testing.assert_allclose(one, want, atol=1e-5)
    exact.encode(TEXTS[:3])
    assert exact._encode._cache_size() == 1  # One program for every call (batches padded to 4).


def test_missing_files_are_named(tmp_path):
    directory = t5.write_random_encoder(tmp_path / "enc", CORPUS[:10], d_model=16, num_layers=1)
    t5.TextEncoder.load(directory, max_len=8)
    for file, message in [("spiece.model", "spiece.model is missing"), ("config.json", "config.json is missing"),
                          ("model.safetensors", "no \\*.safetensors")]:
        broken = tmp_path / f"without-{file}"
        shutil.copytree(directory, broken)
        (broken / file).unlink()
        with pytest.raises(pretrained.CheckpointDirError, match=message):
            t5.TextEncoder.load(broken)
    with pytest.raises(pretrained.CheckpointDirError, match="does not exist"):
        t5.TextEncoder.load(tmp_path / "nowhere")
    # A weight the config needs is absent: the error names the tensor.
    tensors = pretrained.read_tensors(directory)
    del tensors["encoder.block.0.layer.1.DenseReluDense.wi_1.weight"]
    pretrained.write_safetensors(os.path.join(directory, "model.safetensors"), tensors)
    with pytest.raises(ValueError, match="lacks tensor 'encoder.block.0.layer.1.DenseReluDense.wi_1.weight'"):
        t5.TextEncoder.load(directory)


def test_diffusers_layout(tmp_path):
    """Wan 2.1's layout: ROOT/text_encoder/{config.json, weights} + ROOT/tokenizer/spiece.model."""
    flat = t5.write_random_encoder(tmp_path / "flat", CORPUS, d_model=16, num_layers=1)
    root = tmp_path / "pipeline"
    (root / "tokenizer").mkdir(parents=True)
    shutil.copytree(flat, root / "text_encoder")
    shutil.move(root / "text_encoder" / "spiece.model", root / "tokenizer" / "spiece.model")
    (root / "transformer").mkdir()
    a = t5.TextEncoder.load(flat, max_len=8).encode(TEXTS)[0]
    b = t5.TextEncoder.load(root, max_len=8).encode(TEXTS)[0]
    np.testing.assert_array_equal(a, b)
    (root / "tokenizer" / "spiece.model").unlink()
    with pytest.raises(pretrained.CheckpointDirError, match="tokenizer/spiece.model is missing"):
        t5.TextEncoder.load(root)


def test_random_encoder_is_deterministic_and_loads_in_transformers(tmp_path):
    a = t5.write_random_encoder(tmp_path / "a", CORPUS, d_model=32, num_layers=2, seed=3)
    b = t5.write_random_encoder(tmp_path / "b", CORPUS, d_model=32, num_layers=2, seed=3)
    c = t5.write_random_encoder(tmp_path / "c", CORPUS, d_model=32, num_layers=2, seed=4)
    for file in ("config.json", "model.safetensors", "spiece.model"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
    ta, tc = pretrained.read_tensors(a), pretrained.read_tensors(c)
    assert sorted(ta) == sorted(pretrained.read_tensors(b))
    assert not np.array_equal(ta["shared.weight"], tc["shared.weight"])  # The seed matters.
    np.testing.assert_array_equal(t5.Tokenizer(os.path.join(a, "spiece.model"))(TEXTS, 16).ids,
                                  t5.Tokenizer(os.path.join(b, "spiece.model"))(TEXTS, 16).ids)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["model_type"] == "umt5"
    ours = t5.TextEncoder.load(a, max_len=16, dtype=jnp.float32)
    emb, mask = ours.encode(TEXTS)
    rows = emb[mask]
    assert np.abs(rows - rows[0]).max() > 0.1  # Random but not degenerate: tokens differ.
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    model = transformers.UMT5EncoderModel.from_pretrained(str(a)).eval()
    tokens = ours.tokenize(TEXTS)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(tokens.ids, dtype=torch.long),
                    attention_mask=torch.tensor(tokens.mask, dtype=torch.long)).last_hidden_state.numpy()
    np.testing.assert_allclose(emb[mask], ref[mask], atol=1e-4, rtol=0)


def test_config_errors_name_the_field():
    base = dict(vocab_size=10, d_model=8, d_kv=2, num_heads=4, num_layers=1, d_ff=16)
    with pytest.raises(ValueError, match="lacks \\['d_ff'\\]"):
        t5.T5Config.from_json({k: v for k, v in base.items() if k != "d_ff"})
    with pytest.raises(ValueError, match="model_type 'bert'"):
        t5.T5Config.from_json(dict(base, model_type="bert"))
    with pytest.raises(ValueError, match="feed_forward_proj 'gated-wobble'"):
        t5.T5Config.from_json(dict(base, feed_forward_proj="gated-wobble"))
    assert t5.T5Config.from_json(dict(base, feed_forward_proj="gated-gelu")).activation == "gelu_new"
    assert t5.T5Config.from_json(dict(base, feed_forward_proj="gelu")).activation == "gelu"


def test_print_parity_errors():
    """Last in the module: the max abs errors of the parity tests, in one place (pytest -s)."""
    if ERRORS:
        print("\nparity max abs errors:", json.dumps({k: f"{v:.2e}" for k, v in ERRORS.items()}))
    assert all(v < 1e-4 for v in ERRORS.values())
