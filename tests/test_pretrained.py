"""Reading published checkpoint directories (config.json + safetensors) without torch or a network."""

import json

import ml_dtypes
import numpy as np
import pytest

from eflow_jax.models import pretrained


def test_round_trip_and_reference_reader(tmp_path):
    tensors = {"a.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
               "b": np.array([1.5, -2.0], ml_dtypes.bfloat16), "c": np.array([3], np.int64)}
    pretrained.write_safetensors(tmp_path / "model.safetensors", tensors)
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 8}))
    got = pretrained.read_tensors(tmp_path)
    assert pretrained.read_config(tmp_path) == {"d_model": 8}
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and np.array_equal(got[k], v)
    safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="the reference reader is not installed")
    ref = safetensors_numpy.load_file(str(tmp_path / "model.safetensors"))
    assert np.array_equal(ref["a.weight"], got["a.weight"]) and np.array_equal(ref["c"], got["c"])


def test_sharded_index_and_clear_errors(tmp_path):
    pretrained.write_safetensors(tmp_path / "m-1.safetensors", {"x": np.ones(2, np.float32)})
    pretrained.write_safetensors(tmp_path / "m-2.safetensors", {"y": np.zeros(3, np.float16)})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "m-1.safetensors", "y": "m-2.safetensors"}}))
    assert sorted(pretrained.read_tensors(tmp_path)) == ["x", "y"]
    (tmp_path / "m-2.safetensors").unlink()
    with pytest.raises(pretrained.CheckpointDirError, match="m-2.safetensors"):
        pretrained.read_tensors(tmp_path)
    with pytest.raises(pretrained.CheckpointDirError, match="config.json"):
        pretrained.read_config(tmp_path)
    with pytest.raises(pretrained.CheckpointDirError, match="does not exist"):
        pretrained.read_config(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(pretrained.CheckpointDirError, match="no \\*.safetensors"):
        pretrained.read_tensors(empty)


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    pretrained.write_safetensors(path, {"x": np.ones(100, np.float32)})
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(pretrained.CheckpointDirError, match="truncated"):
        pretrained.read_safetensors(path)
