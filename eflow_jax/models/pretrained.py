"""Reading a published checkpoint directory (Hugging Face layout) with no network and no torch.

A directory as the hubs publish it, downloaded beforehand:

    DIR/config.json
    DIR/model.safetensors                       (or diffusion_pytorch_model.safetensors, ...)
    DIR/model.safetensors.index.json + shards   (large checkpoints: the index names each tensor's file)

`read_config` and `read_tensors` are all the text encoder and the video VAE need; errors name the
missing file and what to download. safetensors is a simple format (an 8-byte little-endian header
size, a JSON header of name -> dtype, shape and byte offsets, then the raw bytes), read here with
numpy and ml_dtypes (for bfloat16), so loading a checkpoint needs no extra package.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable

import ml_dtypes
import numpy as np

# safetensors dtype names -> numpy dtypes.
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointDirError(FileNotFoundError):
    """A checkpoint directory lacks a file it needs; the message names it."""


def read_config(directory: str | os.PathLike, what: str = "checkpoint") -> dict:
    """DIR/config.json as a dict; a missing or unreadable file is one clear error."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointDirError(f"{what} directory {directory!r} does not exist: download the checkpoint "
                                 f"(config.json + *.safetensors) into it first.")
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointDirError(f"{path} is missing: a {what} directory needs the published config.json "
                                 f"beside its *.safetensors.")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointDirError(f"{path} is unreadable ({e}); download it again.") from e


def safetensors_files(directory: str | os.PathLike, what: str = "checkpoint") -> list[str]:
    """The weight files of DIR: the shards an *.index.json names, else every *.safetensors."""
    directory = os.fspath(directory)
    names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    index = [n for n in names if n.endswith(".safetensors.index.json")]
    if index:
        with open(os.path.join(directory, index[0])) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
        if missing:
            raise CheckpointDirError(f"{what} {directory}: {index[0]} names {len(missing)} shard(s) that are "
                                     f"missing, e.g. {missing[0]}; download them too.")
        return [os.path.join(directory, s) for s in shards]
    files = [os.path.join(directory, n) for n in names if n.endswith(".safetensors")]
    if not files:
        raise CheckpointDirError(f"{what} {directory} has no *.safetensors weights file; download the "
                                 f"checkpoint's safetensors (PyTorch .bin files are not read).")
    return files


def read_safetensors(path: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Tensors of one .safetensors file as numpy arrays (memory-mapped: only what is used is read)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointDirError(f"{path} is truncated (no header); download it again.")
        (size,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointDirError(f"{path} has an unreadable header ({e}); download it again.") from e
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
    wanted = set(header) if names is None else set(names) & set(header)
    out = {}
    for name in wanted:
        info = header[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which is not supported.")
        start, end = info["data_offsets"]
        if end > data.shape[0]:
            raise CheckpointDirError(f"{path} is truncated (tensor {name!r} runs past the end); download it again.")
        out[name] = data[start:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def read_tensors(directory: str | os.PathLike, what: str = "checkpoint") -> dict[str, np.ndarray]:
    """Every tensor of DIR's safetensors file(s), name -> numpy array (dtypes as stored)."""
    out: dict[str, np.ndarray] = {}
    for path in safetensors_files(directory, what):
        out.update(read_safetensors(path))
    return out


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray]) -> None:
    """Writes numpy arrays as one .safetensors file (tests and converters make tiny checkpoints with it)."""
    names = {np.dtype(v): k for k, v in _DTYPES.items()}
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in names:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} cannot be stored as safetensors here.")
        header[name] = {"dtype": names[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        blobs.append(array.tobytes())
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # The format aligns the data to 8 bytes.
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for blob in blobs:
            f.write(blob)
