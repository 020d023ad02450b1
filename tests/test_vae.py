"""The Wan 2.1 video VAE: parity with diffusers' AutoencoderKLWan, causality, chunking, loading."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eflow_jax import sharding
from eflow_jax.models import pretrained, wan_vae

ONE_DEVICE = sharding.make_mesh(sharding.mesh_config(), jax.devices()[:1])
# 13 frames -> 4 latent frames: the first chunk plus three carried caches each way; H != W catches
# a transposed layout.
CLIP = (2, 13, 32, 24, 3)


def clip(seed=0, shape=CLIP):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    wan_vae.write_random_vae(path, base_dim=8, z_dim=4, seed=0)
    return path


@pytest.fixture(scope="module")
def vae(vae_dir):
    return wan_vae.VideoVAE.load(vae_dir, dtype=jnp.float32, mesh=ONE_DEVICE)


def _diffusers_reference(tmp_path, z_dim=4):
    """A tiny random AutoencoderKLWan (every gamma and bias perturbed), saved the published way."""
    torch = pytest.importorskip("torch", reason="torch is not installed: no reference to compare with")
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed: no reference")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mean = (0.5 * torch.randn(z_dim, generator=gen)).tolist()
    std = (0.5 + 1.5 * torch.rand(z_dim, generator=gen)).tolist()
    model = diffusers.AutoencoderKLWan(base_dim=8, z_dim=z_dim, num_res_blocks=1, latents_mean=mean,
                                       latents_std=std).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        model.decoder.conv_out.weight.mul_(0.3)  # Most pixels inside the clamp: errors stay visible.
    model.save_pretrained(tmp_path)
    return torch, model, np.asarray(mean, np.float32), np.asarray(std, np.float32)


def _to_torch(torch, x_bthwc):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x_bthwc, -1, 1)))


def test_parity_with_diffusers_float32(tmp_path):
    torch, model, mean, std = _diffusers_reference(tmp_path)
    vae = wan_vae.VideoVAE.load(tmp_path, dtype=jnp.float32, mesh=ONE_DEVICE)
    np.testing.assert_array_equal(vae.latents_mean, mean)
    np.testing.assert_array_equal(vae.latents_std, std)
    x = clip()
    with torch.no_grad():
        mu = model.encode(_to_torch(torch, x)).latent_dist.mean.numpy()
    ref_latents = (np.moveaxis(mu, 1, -1) - mean) / std  # The published normalisation.
    latents = np.asarray(vae.encode(x))
    assert latents.shape == ref_latents.shape == (2, 4, 4, 3, 4)
    encode_err = np.abs(latents - ref_latents).max()

    with torch.no_grad():
        ref_videos = model.decode(_to_torch(torch, latents * std + mean)).sample.numpy()
    ref_videos = np.moveaxis(ref_videos, 1, -1)
    videos = np.asarray(vae.decode(latents))
    assert videos.shape == ref_videos.shape == CLIP and videos.dtype == np.float32
    assert (np.abs(ref_videos) < 1).mean() > 0.9  # The clamp hides few differences.
    decode_err = np.abs(videos - ref_videos).max()
    print(f"parity float32: encode max abs {encode_err:.2e} (latents up to {np.abs(ref_latents).max():.2f}), "
          f"decode max abs {decode_err:.2e}")
    assert encode_err < 1e-4 and decode_err < 1e-4


def test_random_vae_loads_in_diffusers_the_same(vae_dir, vae):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    model = diffusers.AutoencoderKLWan.from_pretrained(vae_dir).eval()
    x = clip(1, (1, 5, 16, 16, 3))
    with torch.no_grad():
        mu = model.encode(_to_torch(torch, x)).latent_dist.mean.numpy()
    ref = (np.moveaxis(mu, 1, -1) - vae.latents_mean) / vae.latents_std
    np.testing.assert_allclose(np.asarray(vae.encode(x)), ref, atol=1e-4)


def test_encoder_is_causal(vae):
    x = clip()
    latents = np.asarray(vae.encode(x))
    changed = x.copy()
    changed[:, 1:] = clip(5)[:, 1:]  # Everything but the first frame.
    np.testing.assert_array_equal(np.asarray(vae.encode(changed))[:, 0], latents[:, 0])
    changed = x.copy()
    changed[:, 9:] = -changed[:, 9:]  # Frames 9..12: only the last latent (frames 9..12) may move.
    other = np.asarray(vae.encode(changed))
    np.testing.assert_array_equal(other[:, :3], latents[:, :3])
    assert np.abs(other[:, 3] - latents[:, 3]).max() > 1e-3


def test_decoder_is_causal(vae):
    latents = np.random.default_rng(2).normal(size=(2, 4, 4, 3, 4)).astype(np.float32)
    videos = np.asarray(vae.decode(latents))
    changed = latents.copy()
    changed[:, 2:] += 1.0
    other = np.asarray(vae.decode(changed))
    np.testing.assert_array_equal(other[:, :5], videos[:, :5])  # Latents 0, 1 -> frames 0..4.
    assert np.abs(other[:, 5:] - videos[:, 5:]).max() > 1e-3
    # Decoding the first k latents alone gives the first 1 + 4 (k - 1) frames of the whole.
    np.testing.assert_allclose(np.asarray(vae.decode(latents[:, :2])), videos[:, :5], atol=1e-6)


def test_pieces_with_a_carried_cache_equal_one_call(vae):
    x = clip(3)
    whole = np.asarray(vae.encode(x))
    head, cache = vae.encode(x[:, :5], return_cache=True)
    tail = vae.encode(x[:, 5:], cache=cache)
    np.testing.assert_allclose(np.concatenate([head, tail], axis=1), whole, atol=1e-6)
    videos = np.asarray(vae.decode(whole))
    first, cache = vae.decode(whole[:, :1], return_cache=True)
    rest = vae.decode(whole[:, 1:], cache=cache)
    assert first.shape[1] == 1 and rest.shape[1] == 12
    np.testing.assert_allclose(np.concatenate([first, rest], axis=1), videos, atol=1e-6)


def test_larger_time_steps_give_the_same_result(vae):
    """1, 2 (+ a remainder) or 3 latents per scan step: the same function if every conv is causal
    (a conv that peeks at a later frame changes with the chunking; the causality tests above
    cannot see that, since each latent is computed from one chunk)."""
    x = clip(8)
    latents = np.asarray(vae.encode(x))
    videos = np.asarray(vae.decode(latents))
    for k in (2, 3):
        np.testing.assert_allclose(np.asarray(vae.encode(x, latents_per_step=k)), latents, atol=1e-5)
        np.testing.assert_allclose(np.asarray(vae.decode(latents, latents_per_step=k)), videos, atol=1e-5)


def test_bf16_tracks_float32(vae_dir, vae):
    bf16 = wan_vae.VideoVAE.load(vae_dir, dtype=jnp.bfloat16, mesh=ONE_DEVICE)
    x = clip(4, (1, 5, 16, 16, 3))
    ref = np.asarray(vae.encode(x))
    err = np.abs(np.asarray(bf16.encode(x)) - ref).max()
    assert err < 0.05 * np.abs(ref).max(), err
    videos = np.asarray(bf16.decode(ref))
    assert videos.dtype == np.float32 and np.abs(videos - np.asarray(vae.decode(ref))).max() < 0.05


def test_uint8_input_and_data_parallel_batches(vae_dir, vae):
    """uint8 clips are scaled as training scales them; 3 clips over 8 devices pad and trim."""
    pixels = np.random.default_rng(6).integers(0, 256, (3, 5, 16, 16, 3), dtype=np.uint8)
    ref = np.asarray(vae.encode(pixels.astype(np.float32) * (2 / 255) - 1))
    eight = wan_vae.VideoVAE.load(vae_dir, dtype=jnp.float32)  # All 8 (fake) CPU devices.
    assert eight.batch_multiple == 8
    np.testing.assert_allclose(np.asarray(eight.encode(pixels)), ref, atol=1e-5)


def test_decode_to_pixels_in_chunks(vae):
    latents = np.random.default_rng(7).normal(size=(5, 2, 2, 2, 4)).astype(np.float32)
    whole = np.asarray(vae.decode(latents))
    got = wan_vae.decode_to_pixels(vae, latents, chunk=2)
    assert got.dtype == np.float32 and got.shape == (5, 5, 16, 16, 3)
    np.testing.assert_allclose(got, whole, atol=1e-6)


def test_random_vae_is_deterministic(tmp_path, vae_dir):
    again = tmp_path / "again"
    wan_vae.write_random_vae(again, base_dim=8, z_dim=4, seed=0)
    for name in ("config.json", wan_vae.WEIGHTS_NAME):
        assert (again / name).read_bytes() == (vae_dir / name).read_bytes()
    assert wan_vae.vae_digest(again) == wan_vae.vae_digest(vae_dir)
    other = tmp_path / "other"
    wan_vae.write_random_vae(other, base_dim=8, z_dim=4, seed=1)
    assert wan_vae.vae_digest(other) != wan_vae.vae_digest(vae_dir)
    config = json.loads((vae_dir / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKLWan" and len(config["latents_std"]) == 4


def test_clear_errors(tmp_path, vae_dir, vae):
    with pytest.raises(pretrained.CheckpointDirError, match="does not exist"):
        wan_vae.VideoVAE.load(tmp_path / "nowhere")
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / wan_vae.WEIGHTS_NAME).write_bytes((vae_dir / wan_vae.WEIGHTS_NAME).read_bytes())
    with pytest.raises(pretrained.CheckpointDirError, match="config.json is missing"):
        wan_vae.VideoVAE.load(no_config)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((vae_dir / "config.json").read_text())
    with pytest.raises(pretrained.CheckpointDirError, match="no \\*.safetensors"):
        wan_vae.VideoVAE.load(no_weights)
    # Weights of another size than the config says: one line naming a tensor.
    (no_weights / "config.json").write_text(
        json.dumps(dict(json.loads((vae_dir / "config.json").read_text()), base_dim=16)))
    (no_weights / wan_vae.WEIGHTS_NAME).write_bytes((vae_dir / wan_vae.WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match="tensor decoder.conv_in.bias has shape \\(32,\\).*implies \\(64,\\)"):
        wan_vae.VideoVAE.load(no_weights)
    tensors = pretrained.read_tensors(vae_dir)
    del tensors["decoder.conv_out.bias"]
    pretrained.write_safetensors(no_weights / wan_vae.WEIGHTS_NAME, tensors)
    (no_weights / "config.json").write_text((vae_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="1 tensor\\(s\\) missing \\(e.g. decoder.conv_out.bias\\)"):
        wan_vae.VideoVAE.load(no_weights)
    wan22 = dict(json.loads((vae_dir / "config.json").read_text()), is_residual=True)
    with pytest.raises(ValueError, match="Wan 2.2"):
        wan_vae.VAEConfig.from_diffusers(wan22)
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        vae.encode(np.zeros((1, 8, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(np.zeros((1, 5, 20, 16, 3), np.float32))


def test_param_names_round_trip(vae_dir):
    """diffusers names -> flax tree -> diffusers names, shapes and values unchanged."""
    tensors = pretrained.read_tensors(vae_dir)
    config = wan_vae.VAEConfig.from_diffusers(json.loads((vae_dir / "config.json").read_text()))
    back = wan_vae.params_to_torch(wan_vae.params_from_torch(tensors, config))
    assert sorted(back) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name], value)


def test_published_size_shapes():
    """The default config is the published Wan 2.1 VAE: 127M params, 17x480x832 -> 5x60x104x16."""
    shapes = wan_vae.param_shapes(wan_vae.VAEConfig())
    count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert 126e6 < count < 128e6, count
    assert wan_vae.VAEConfig().latent_shape((17, 480, 832, 3)) == (5, 60, 104, 16)
    assert os.path.basename(wan_vae.WEIGHTS_NAME) == "diffusion_pytorch_model.safetensors"
