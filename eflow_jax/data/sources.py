"""Random-access data sources (grain's `__len__` + `__getitem__` protocol) and their record format.

Sources, and what they return per index:
  ArrayRecordClipSource  clips made by eflow_jax.data.prepare: {'video': uint8 [T,H,W,3], 'label',
                         'caption' (str, captioned datasets only)}
  TfdsSource             a TFDS dataset in array_record format (Tensor features, no TF): same keys
  LatentSource           precomputed VAE latents (ArrayRecord / .npy): {'video': latents [T,h,w,c],
                         'label', optional 'text_embedding', 'text_mask', 'caption'}
  MovingShapesSource     synthetic, re-exported from synthetic.py
  TextEmbeddings         what `python -m eflow_jax.data.embed_text` writes: {'text_embedding' bf16
                         [L, D], 'text_mask' bool [L]} per record index of a dataset
Labels are int32 scalars. `text_dir=` on the clip and latent sources joins a TextEmbeddings dir
into each example by index.

Record format (one ArrayRecord record = one example), self-describing and pickle-free:
  b"EFV1" | uint32 little-endian header length | JSON header | payload bytes
The header holds `meta` (JSON values), `arrays` (name -> [dtype, shape, offset]) and `blobs`
(name -> [[offset, nbytes], ...], e.g. one JPEG per frame); offsets index the payload.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_dtypes  # Also registers 'bfloat16' with numpy, so records can name it.
import numpy as np
from array_record.python import array_record_data_source, array_record_module

from eflow_jax.data import video_io
from eflow_jax.data.synthetic import MovingShapesSource

__all__ = [
    "ArrayRecordClipSource",
    "CorruptRecordError",
    "LatentSource",
    "MovingShapesSource",
    "TextEmbeddings",
    "TfdsSource",
    "dataset_fingerprint",
    "load_manifest",
    "pack_record",
    "unpack_record",
    "write_latents",
]

RECORD_MAGIC = b"EFV1"
MANIFEST_NAME = "manifest.json"
TEXT_KIND = "text_embeddings"
PREPARE_HINT = (
    "python -m eflow_jax.data.prepare --src=VIDEO_DIR [--annotations=train.csv] --out={path} "
    "--frames=17 --fps=8 --size=128"
)
# Random access needs one record per chunk (group_size:1); JPEG payloads don't compress further.
WRITER_OPTIONS = {"uncompressed": "group_size:1,uncompressed", "zstd": "group_size:1,zstd:3"}


class CorruptRecordError(ValueError):
    """A stored example could not be read or decoded."""


def pack_record(
    *,
    meta: Mapping[str, Any] | None = None,
    arrays: Mapping[str, np.ndarray] | None = None,
    blobs: Mapping[str, Sequence[bytes]] | None = None,
) -> bytes:
    """Serialises one example: JSON metadata, raw numpy arrays and lists of byte strings."""
    header: dict[str, Any] = {"meta": dict(meta or {}), "arrays": {}, "blobs": {}}
    payload, offset = [], 0
    for name, array in (arrays or {}).items():
        array = np.ascontiguousarray(array)
        # ml_dtypes' types (bfloat16) have no numpy type string ('<V2'): store their name.
        dtype = array.dtype.name if array.dtype.kind == "V" else array.dtype.str
        header["arrays"][name] = [dtype, list(array.shape), offset]
        payload.append(array.tobytes())
        offset += array.nbytes
    for name, items in (blobs or {}).items():
        spans = []
        for item in items:
            spans.append([offset, len(item)])
            payload.append(bytes(item))
            offset += len(item)
        header["blobs"][name] = spans
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([RECORD_MAGIC, struct.pack("<I", len(header_bytes)), header_bytes, *payload])


def unpack_record(data: bytes) -> dict[str, Any]:
    """Inverse of pack_record: {'meta': dict, <array name>: ndarray, <blob name>: list[bytes]}.

    Raises:
        CorruptRecordError: bad magic, header or payload size.
    """
    data = bytes(data)
    if data[:4] != RECORD_MAGIC or len(data) < 8:
        raise CorruptRecordError(f"not an eflow_jax record (magic {data[:4]!r})")
    (header_len,) = struct.unpack("<I", data[4:8])
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptRecordError(f"unreadable record header: {e}") from e
    payload = memoryview(data)[8 + header_len :]
    out: dict[str, Any] = {"meta": header["meta"]}
    for name, (dtype, shape, offset) in header["arrays"].items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if offset + nbytes > len(payload):
            raise CorruptRecordError(f"array {name!r} runs past the end of the record")
        out[name] = np.frombuffer(payload[offset : offset + nbytes], dtype=dtype).reshape(shape)
    for name, spans in header["blobs"].items():
        if spans and spans[-1][0] + spans[-1][1] > len(payload):
            raise CorruptRecordError(f"blob list {name!r} runs past the end of the record")
        out[name] = [payload[o : o + n].tobytes() for o, n in spans]
    return out


def record_meta(data: bytes) -> dict[str, Any]:
    """Only the `meta` of a record: its header is parsed, its payload left alone."""
    view = memoryview(data)
    if len(view) < 8 or bytes(view[:4]) != RECORD_MAGIC:
        raise CorruptRecordError(f"not an eflow_jax record (magic {bytes(view[:4])!r})")
    (header_len,) = struct.unpack("<I", view[4:8])
    try:
        return json.loads(bytes(view[8 : 8 + header_len]))["meta"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError) as e:
        raise CorruptRecordError(f"unreadable record header: {e}") from e


def decode_clip_record(data: bytes) -> dict[str, Any]:
    """A prepared clip record -> {'video': uint8 [T, H, W, 3], 'label': int32 scalar} (+ 'caption': str
    when the dataset is captioned)."""
    record = unpack_record(data)
    meta = record["meta"]
    try:
        if meta["codec"] == "jpeg":
            video = video_io.decode_jpeg_frames(record["frames"])
        else:
            video = np.array(record["video"])  # Copy: the buffer belongs to the record bytes.
    except (KeyError, video_io.VideoDecodeError) as e:
        raise CorruptRecordError(f"clip payload undecodable: {e}") from e
    if list(video.shape) != meta["shape"]:
        raise CorruptRecordError(
            f"clip decoded to {list(video.shape)}, header says {meta['shape']}"
        )
    example = {"video": video, "label": np.int32(meta["label"])}
    if "caption" in meta:
        example["caption"] = meta["caption"]
    return example


def load_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Reads `path`/manifest.json of a prepared dataset; errors name the prepare command."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"dataset directory {path!r} does not exist; create it with:\n  "
            + PREPARE_HINT.format(path=path)
        )
    manifest_path = os.path.join(path, MANIFEST_NAME)
    if not os.path.exists(manifest_path):
        raise FileNotFoundError(
            f"{manifest_path} is missing: preparation never ran or did not finish; "
            "(re)run (it resumes):\n  " + PREPARE_HINT.format(path=path)
        )
    with open(manifest_path) as f:
        return json.load(f)


def dataset_fingerprint(manifest: Mapping[str, Any]) -> str:
    """Identifies a prepared dataset's record order (shards, counts, source hash): what text
    embeddings aligned by record index must have been computed for."""
    key = {"num_examples": manifest.get("num_examples"), "shards": manifest.get("shards"),
           "source_hash": (manifest.get("source") or {}).get("hash")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _shard_paths(path: str, manifest: Mapping[str, Any]) -> list[str]:
    # "file[0:n]" tells array_record the record count, so opening the source touches no shard.
    return [f"{os.path.join(path, s['file'])}[0:{s['num_examples']}]" for s in manifest["shards"]]


class _RecordSource:
    """An ArrayRecord reader over a manifest's shards, with a corrupt-record policy and an optional
    join of text embeddings (a TextEmbeddings dir computed for this dataset) by record index."""

    def __init__(self, path: str | os.PathLike, *, on_corrupt: str = "skip",
                 text_dir: str | os.PathLike | None = None):
        if on_corrupt not in ("skip", "fail"):
            raise ValueError(f"on_corrupt must be 'skip' or 'fail', got {on_corrupt!r}")
        self.path = os.fspath(path)
        self.manifest = load_manifest(self.path)
        self.on_corrupt = on_corrupt
        self.num_corrupt = 0
        shards = _shard_paths(self.path, self.manifest)
        if not shards:
            raise ValueError(
                f"dataset {self.path} is empty (0 examples); see 'skipped' in its manifest.json"
            )
        self._records = array_record_data_source.ArrayRecordDataSource(shards)
        self.text = None if text_dir is None else TextEmbeddings.for_dataset(text_dir, self.path, self.manifest)

    def __len__(self) -> int:
        return len(self._records)

    def _decode(self, data: bytes) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        """The example at `index`; None for a corrupt record in 'skip' mode (grain drops Nones)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        try:
            example = self._decode(self._records[index])
            if self.text is not None:
                example.update(self.text[index])
            return example
        except Exception as e:  # noqa: BLE001 - any reader/decoder failure is a corrupt record here.
            if self.on_corrupt == "fail":
                raise CorruptRecordError(
                    f"record {index} of {self.path} is corrupt: {e}. Re-prepare the dataset "
                    "or set data.on_corrupt='skip'"
                ) from e
            self.num_corrupt += 1
            logging.warning(
                "skipping corrupt record %d of %s (%d so far in this process): %s",
                index,
                self.path,
                self.num_corrupt,
                e,
            )
            return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, len={len(self)})"


class ArrayRecordClipSource(_RecordSource):
    """Clips made by `python -m eflow_jax.data.prepare`: {'video': uint8 [T,H,W,3], 'label'}, plus
    'caption' for captioned datasets, plus 'text_embedding' and 'text_mask' with `text_dir`."""

    def __init__(self, path: str | os.PathLike, *, on_corrupt: str = "skip",
                 text_dir: str | os.PathLike | None = None):
        super().__init__(path, on_corrupt=on_corrupt, text_dir=text_dir)
        if self.manifest.get("kind") != "clips":
            raise ValueError(
                f"{self.path} holds {self.manifest.get('kind')!r} records, not prepared clips"
            )

    @property
    def clip_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["clip_shape"])

    def _decode(self, data: bytes) -> dict[str, Any]:
        return decode_clip_record(data)


class LatentSource:
    """Precomputed latents (and optional text embeddings/masks) per example; nothing to decode.

    Two layouts under `path`:
      ArrayRecord: manifest.json (kind 'latents') + shards written by `write_latents`.
      .npy: latents.npy [N, T, h, w, c] (+ labels.npy [N], text_embeddings.npy [N, L, D],
        text_masks.npy [N, L]), memory-mapped, so only the rows read are loaded.
    `text_dir`: a TextEmbeddings dir whose 'text_embedding' / 'text_mask' replace stored ones.
    """

    def __init__(self, path: str | os.PathLike, *, on_corrupt: str = "skip",
                 text_dir: str | os.PathLike | None = None):
        self.path = os.fspath(path)
        npy = os.path.join(self.path, "latents.npy")
        self._records = (
            None if os.path.exists(npy) else _LatentRecords(self.path, on_corrupt=on_corrupt, text_dir=text_dir)
        )
        self._arrays: dict[str, np.ndarray] = {}
        self.text = None if self._records is None else self._records.text
        if self._records is None:
            for key, name in [
                ("video", "latents"),
                ("label", "labels"),
                ("text_embedding", "text_embeddings"),
                ("text_mask", "text_masks"),
            ]:
                file = os.path.join(self.path, name + ".npy")
                if os.path.exists(file):
                    self._arrays[key] = np.load(file, mmap_mode="r")
            lengths = {k: len(v) for k, v in self._arrays.items()}
            if len(set(lengths.values())) != 1:
                raise ValueError(
                    f"latent arrays in {self.path} disagree on the example count: {lengths}"
                )
            if not lengths["video"]:
                raise ValueError(f"latent dataset {self.path} is empty (0 examples)")
            if text_dir is not None:
                self.text = TextEmbeddings.for_dataset(text_dir, self.path, {"num_examples": lengths["video"]})

    @property
    def latent_shape(self) -> tuple[int, ...]:
        if self._records is not None:
            return tuple(self._records.manifest["latent_shape"])
        return tuple(self._arrays["video"].shape[1:])

    def __len__(self) -> int:
        return len(self._records) if self._records is not None else len(self._arrays["video"])

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        if self._records is not None:
            return self._records[index]
        example = {k: np.asarray(v[index]) for k, v in self._arrays.items()}
        example["label"] = np.int32(example.get("label", 0))
        if self.text is not None:
            example.update(self.text[index])
        return example


class _LatentRecords(_RecordSource):
    def _decode(self, data: bytes) -> dict[str, Any]:
        record = unpack_record(data)
        example = {
            "video": np.array(record["latent"]),
            "label": np.int32(record["meta"].get("label", 0)),
        }
        for key in ("text_embedding", "text_mask"):
            if key in record:
                example[key] = np.array(record[key])
        if "caption" in record["meta"]:
            example["caption"] = record["meta"]["caption"]
        return example


def write_latents(
    out_dir: str | os.PathLike,
    examples: Iterable[Mapping[str, Any]],
    *,
    examples_per_shard: int = 1024,
) -> dict[str, Any]:
    """Writes precomputed latents as ArrayRecord shards + manifest.json, readable by LatentSource.

    Args:
        out_dir: output directory (created).
        examples: dicts with 'latent' [T, h, w, c] (any float dtype, kept as is), optional 'label'
          (int), 'text_embedding' [L, D], 'text_mask' [L] and 'caption' (str; the manifest is then
          marked captioned, for `python -m eflow_jax.data.embed_text`).
        examples_per_shard: records per shard file.

    Returns:
        the manifest written.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    shards, shape, writer, count, captioned = [], None, None, 0, False
    for example in examples:
        latent = np.asarray(example["latent"])
        if shape is None:
            shape = list(latent.shape)
        elif list(latent.shape) != shape:
            raise ValueError(
                f"latent {count} has shape {latent.shape}, the first had {tuple(shape)}"
            )
        if writer is None or shards[-1]["num_examples"] == examples_per_shard:
            if writer is not None:
                writer.close()
            shards.append({"file": f"latents-{len(shards):05d}.array_record", "num_examples": 0})
            writer = array_record_module.ArrayRecordWriter(
                os.path.join(out_dir, shards[-1]["file"]), WRITER_OPTIONS["uncompressed"]
            )
        arrays = {"latent": latent}
        arrays.update(
            {k: np.asarray(example[k]) for k in ("text_embedding", "text_mask") if k in example}
        )
        meta = {"label": int(example.get("label", 0))}
        if "caption" in example:
            meta["caption"], captioned = str(example["caption"]), True
        writer.write(pack_record(meta=meta, arrays=arrays))
        shards[-1]["num_examples"] += 1
        count += 1
    if writer is not None:
        writer.close()
    manifest = {"kind": "latents", "num_examples": count, "latent_shape": shape, "shards": shards}
    if captioned:
        manifest["captioned"] = True
    with open(os.path.join(out_dir, MANIFEST_NAME), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


class TextEmbeddings:
    """Text embeddings aligned by record index with a dataset, as `python -m eflow_jax.data.embed_text`
    writes them: `embeddings[i]` -> {'text_embedding': bfloat16 [L, D], zero after the text;
    'text_mask': bool [L], a prefix of Trues}.

    Each record stores the text's rows only ([n, D], n = its tokens with the EOS) and the mask [L];
    the zero rows are added back here, so a 20-token caption costs 20 rows, not L.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        manifest_path = os.path.join(self.path, MANIFEST_NAME)
        if not os.path.exists(manifest_path):
            raise FileNotFoundError(
                f"{manifest_path} is missing: text embedding never ran or did not finish; (re)run it (it "
                f"resumes): python -m eflow_jax.data.embed_text --encoder=ENCODER_DIR --data=DATASET_DIR "
                f"--out={self.path}")
        with open(manifest_path) as f:
            self.manifest = json.load(f)
        if self.manifest.get("kind") != TEXT_KIND:
            raise ValueError(f"{self.path} holds {self.manifest.get('kind')!r} records, not text embeddings")
        self.max_len, self.d_model = int(self.manifest["max_len"]), int(self.manifest["d_model"])
        shards = _shard_paths(self.path, self.manifest)
        self._records = array_record_data_source.ArrayRecordDataSource(shards) if shards else None

    @classmethod
    def for_dataset(cls, path: str | os.PathLike, dataset_path: str,
                    dataset_manifest: Mapping[str, Any]) -> TextEmbeddings:
        """Opens `path` after checking that it was computed for this dataset (count, record order)."""
        text = cls(path)
        have, want = len(text), dataset_manifest.get("num_examples")
        fingerprint = text.manifest.get("dataset", {}).get("fingerprint")
        if have != want:
            raise ValueError(f"text embeddings {text.path} hold {have} records but dataset {dataset_path} has "
                             f"{want}: they belong to another dataset; run python -m eflow_jax.data.embed_text "
                             f"--data={dataset_path} --out=NEW_DIR")
        if fingerprint and "shards" in dataset_manifest and fingerprint != dataset_fingerprint(dataset_manifest):
            raise ValueError(f"text embeddings {text.path} were computed for another preparation of "
                             f"{dataset_path} (its shards or sources differ): records would not line up; "
                             f"run python -m eflow_jax.data.embed_text --data={dataset_path} --out=NEW_DIR")
        return text

    def __len__(self) -> int:
        return int(self.manifest["num_examples"])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} text embeddings")
        record = unpack_record(self._records[index])
        mask, rows = np.array(record["text_mask"]), record["text_embedding"]
        if mask.shape != (self.max_len,) or rows.shape != (int(mask.sum()), self.d_model):
            raise CorruptRecordError(f"text embedding {index} of {self.path}: rows {list(rows.shape)} and mask "
                                     f"{list(mask.shape)} do not fit max_len {self.max_len}, d_model {self.d_model}")
        embedding = np.zeros((self.max_len, self.d_model), ml_dtypes.bfloat16)
        embedding[: len(rows)] = rows
        return {"text_embedding": embedding, "text_mask": mask}

    def __repr__(self) -> str:
        return f"TextEmbeddings(path={self.path!r}, len={len(self)}, max_len={self.max_len}, d_model={self.d_model})"


class TfdsSource:
    """A TFDS dataset through `tfds.data_source` (array_record files), TF-free.

    Works for datasets whose features are plain `tfds.features.Tensor`s (what TFDS can write and
    read without TensorFlow): the video is either uint8 [T, H, W, C] or a [T] vector of encoded JPEG
    frames (as `prepare --tfds_name=...` writes it).
    """

    def __init__(
        self,
        name: str,
        *,
        split: str = "train",
        data_dir: str | None = None,
        video_key: str = "video",
        label_key: str = "label",
    ):
        import tensorflow_datasets as tfds  # Optional dependency (the 'tfds' extra).

        self.name, self.split, self.video_key, self.label_key = name, split, video_key, label_key
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir)
        except Exception as e:  # noqa: BLE001 - tfds raises many kinds; all mean "not there".
            raise FileNotFoundError(
                f"TFDS dataset {name!r} (split {split!r}) not found in data_dir {data_dir!r}: "
                f"{e}. Prepare it "
                "with file_format='array_record', or from videos with:\n  "
                + PREPARE_HINT.format(path="OUT")
                + f" --tfds_name={name}"
            ) from e
        if not len(self._source):
            raise ValueError(f"TFDS dataset {name!r} split {split!r} is empty")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self._source[index]
        video = example[self.video_key]
        if video.dtype == object:  # A vector of encoded frames.
            video = video_io.decode_jpeg_frames(list(video))
        return {"video": np.asarray(video), "label": np.int32(example.get(self.label_key, 0))}
