"""Prepared clips -> a TFDS dataset (array_record, plain Tensor features), without TensorFlow.

Used by `python -m eflow_jax.data.prepare --tfds_name=...`; read the result with
`sources.TfdsSource(name, data_dir=f'{out}/tfds')`.
"""

from __future__ import annotations

import os

import numpy as np
from array_record.python import array_record_data_source

from eflow_jax.data.sources import load_manifest


def export_tfds(out: str, name: str, *, split: str = "train") -> str:
    """Writes the prepared clips again as a TFDS dataset (array_record, Tensor features: no TF).

    Features: 'video' = [T] JPEG byte strings (codec 'jpeg') or uint8 [T, H, W, 3] (codec 'raw'),
    'label' = int64. Read it with sources.TfdsSource(name, data_dir=f'{out}/tfds').

    Returns:
        the TFDS dataset directory.
    """
    import tensorflow_datasets as tfds  # The optional 'tfds' extra.

    manifest = load_manifest(out)
    if not name.isidentifier() or name != name.lower():
        raise ValueError(f"--tfds_name must be snake_case (TFDS builder names are), got {name!r}")
    frames, height, width, channels = manifest["clip_shape"]
    jpeg = manifest["settings"]["codec"] == "jpeg"
    video_feature = (
        tfds.features.Tensor(shape=(frames,), dtype=np.object_)
        if jpeg
        else tfds.features.Tensor(shape=(frames, height, width, channels), dtype=np.uint8)
    )
    shards = [f"{os.path.join(out, s['file'])}[0:{s['num_examples']}]" for s in manifest["shards"]]

    def info(builder):
        return tfds.core.DatasetInfo(
            builder=builder,
            description=f"Clips prepared by eflow_jax.data.prepare in {out}",
            features=tfds.features.FeaturesDict(
                {"video": video_feature, "label": tfds.features.Tensor(shape=(), dtype=np.int64)}
            ),
        )

    def generate(builder):
        from eflow_jax.data.sources import unpack_record

        records = array_record_data_source.ArrayRecordDataSource(shards)
        for key in range(len(records)):
            record = unpack_record(records[key])
            video = record["frames"] if jpeg else record["video"]
            yield key, {"video": video, "label": record["meta"]["label"]}

    builder_class = type(
        "PreparedClips",
        (tfds.core.GeneratorBasedBuilder,),
        {
            "name": name,
            "VERSION": tfds.core.Version("1.0.0"),
            "_info": info,
            "_split_generators": lambda builder, dl_manager: {split: builder._generate_examples()},
            "_generate_examples": generate,
        },
        skip_registration=True,
    )
    tfds.disable_progress_bar()
    builder = builder_class(data_dir=os.path.join(out, "tfds"), file_format="array_record")
    builder.download_and_prepare()
    return os.fspath(builder.data_dir)
