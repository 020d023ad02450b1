r"""Captions of a prepared dataset -> text embeddings aligned by record index, once, before training.

  python -m eflow_jax.data.embed_text --encoder=/models/Wan2.1-T2V-1.3B-Diffusers \
      --data=/data/webvid_17x128 [--out=/data/webvid_17x128/text_embeddings] [--max_len=77] [--batch=64]

Reads the caption of every record of --data (clips from `prepare` with caption annotations, or
latents from `sources.write_latents` with captions), encodes them with the frozen T5-family encoder
in --encoder (models/t5.py: a checkpoint dir or a diffusers root), and writes, for record i, its
bfloat16 embedding and bool mask as record i of --out (`sources.TextEmbeddings` reads them; the
clip and latent sources join them with `text_dir=`). The text encoder never runs in training.

Captions that cannot be encoded as they are never stop the run; each is counted in the manifest
(with the first record indices) and in the last progress line:
  * truncated: longer than --max_len tokens; the first max_len - 1 pieces and the EOS are kept;
  * empty: no caption, or only whitespace. Embedded as the empty string "" (the EOS alone), which
    is what a text-to-video model sees as the null prompt; `prepare` already drops such clips, so
    this happens only with latents or hand-written records;
  * bad: a record that cannot be read, or a caption that is not text or not valid UTF-8; embedded
    as "" too.
Resumable like `prepare`: shards of --records_per_shard records are written to a temp name, renamed,
then marked done by `<shard>.done.json`; a rerun keeps finished shards. `plan.json` records the
encoder (a digest of config.json, weight file names/sizes and the tokenizer), --max_len and the
dataset's record order; a rerun with anything else into the same --out is refused. manifest.json is
written last: its existence means the embeddings are complete.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import ml_dtypes
import numpy as np
from array_record.python import array_record_data_source, array_record_module

from eflow_jax.data.sources import (
    MANIFEST_NAME,
    TEXT_KIND,
    WRITER_OPTIONS,
    dataset_fingerprint,
    load_manifest,
    pack_record,
    record_meta,
)

MAX_LISTED = 100  # Record indices listed per problem kind in the manifest (all are counted).


def read_captions(data_dir: str, start: int, stop: int, records=None) -> list[Any]:
    """meta['caption'] of records [start, stop) of a prepared dataset (None where a record has no
    caption; a CorruptRecordError instance where it cannot be read)."""
    if records is None:
        manifest = load_manifest(data_dir)
        records = array_record_data_source.ArrayRecordDataSource(
            [f"{os.path.join(data_dir, s['file'])}[0:{s['num_examples']}]" for s in manifest["shards"]])
    captions: list[Any] = []
    for chunk in range(start, stop, 256):  # Whole records are read (clips: ~100 KB each): a few at a time.
        keys = range(chunk, min(chunk + 256, stop))
        try:
            datas = records.__getitems__(keys)
        except Exception:  # noqa: BLE001 - one unreadable record: read them one by one to find it.
            datas = [_read_or_error(records, k) for k in keys]
        for data in datas:
            try:
                captions.append(record_meta(data).get("caption"))
            except Exception as e:  # noqa: BLE001 - an unreadable record is counted, never fatal.
                captions.append(e)
    return captions


def _read_or_error(records, key: int):
    try:
        return records[key]
    except Exception as e:  # noqa: BLE001
        return e


def classify(caption: Any) -> tuple[str, str]:
    """(text to encode, 'ok' | 'empty' | 'bad')."""
    if caption is None:
        return "", "empty"
    if not isinstance(caption, str):
        return "", "bad"
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError:
        return "", "bad"
    return (caption, "ok") if caption.strip() else ("", "empty")


def _shard_name(index: int, count: int) -> str:
    return f"text-{index:05d}-of-{count:05d}.array_record"


def _write_json_atomic(path: str, value: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def _check_plan(out: str, plan: dict[str, Any]) -> None:
    """Refuses to resume into `out` when it holds embeddings of another encoder, max_len or dataset."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "plan.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        differ = [k for k in plan if old.get(k) != plan[k]]
        if differ:
            shown = ", ".join(f"{k} {old.get(k)!r:.60} -> {plan[k]!r:.60}" for k in differ)
            raise ValueError(f"{out} holds text embeddings made with other settings ({shown}); use another "
                             f"--out or delete {out}")
    _write_json_atomic(path, plan)


def _encode_shard(encoder, captions: Sequence[Any], first_index: int, path: str, progress) -> dict:
    """Encodes one shard's captions and writes its records (temp file, rename); returns its report."""
    texts, kinds = zip(*map(classify, captions), strict=True) if captions else ((), ())
    tokens = encoder.tokenize(list(texts))
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}.{os.getpid()}")
    writer = array_record_module.ArrayRecordWriter(tmp, WRITER_OPTIONS["uncompressed"])
    step = encoder.batch_size * max(1, 1024 // encoder.batch_size)  # Write out every ~1k texts.
    for start in range(0, len(texts), step):
        part = type(tokens)(*(a[start : start + step] for a in tokens))
        embeddings, masks = encoder.encode_tokens(part)
        for embedding, mask in zip(embeddings, masks, strict=True):
            rows = embedding[: int(mask.sum())].astype(ml_dtypes.bfloat16)  # Only the text's rows (see sources).
            writer.write(pack_record(arrays={"text_embedding": rows, "text_mask": mask}))
        progress(len(embeddings))
    writer.close()
    os.replace(tmp, path)
    indices = {kind: [first_index + i for i, k in enumerate(kinds) if k == kind] for kind in ("empty", "bad")}
    indices["truncated"] = [first_index + int(i) for i in np.flatnonzero(tokens.truncated)]
    return {"file": os.path.basename(path), "num_examples": len(texts),
            **{f"num_{k}": len(v) for k, v in indices.items()},
            **{k: v[:MAX_LISTED] for k, v in indices.items()}}


class _Progress:
    """One line at most every `every` seconds: texts/s and the time left."""

    def __init__(self, total: int, log: Callable[[str], None], every: float = 30.0):
        self.total, self.log, self.every = total, log, every
        self.done, self.started, self.last = 0, time.time(), 0.0

    def __call__(self, count: int, force: bool = False, note: str = "") -> None:
        self.done += count
        now = time.time()
        if force or now - self.last >= self.every:
            rate = self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            self.log(f"[embed_text] {self.done}/{self.total} captions{note} | {rate:.1f} captions/s, eta {eta:.0f} s")
            self.last = now


def embed_dataset(
    encoder_dir: str,
    data_dir: str,
    out: str | None = None,
    *,
    max_len: int = 77,
    batch_size: int = 64,
    records_per_shard: int = 4096,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Embeds (or resumes embedding) the captions of `data_dir`; returns the manifest it writes.

    Args:
        encoder_dir: T5-family checkpoint dir or diffusers root (models/t5.py).
        data_dir: a prepared captioned dataset (clips or latents with a manifest.json).
        out: output dir (default data_dir/text_embeddings).
        max_len: tokens per caption, EOS included.
        batch_size: captions per encoder call.
        records_per_shard: records per output shard: the unit of resumption.
        log: where progress lines go.
    """
    from eflow_jax.models import pretrained, t5  # jax and flax: imported once the arguments are read.

    if min(max_len, batch_size, records_per_shard) < 1:
        raise ValueError(f"--max_len={max_len}, --batch={batch_size}, --records_per_shard={records_per_shard} "
                         "must all be >= 1")
    data_dir = os.path.abspath(data_dir)
    out = os.path.abspath(out or os.path.join(data_dir, "text_embeddings"))
    manifest = load_manifest(data_dir)
    if manifest.get("kind") not in ("clips", "latents"):
        raise ValueError(f"{data_dir} holds {manifest.get('kind')!r} records, not clips or latents")
    if not manifest.get("captioned"):
        raise ValueError(f"{data_dir} is not captioned (its manifest.json has no 'captioned': true): prepare it "
                         "with caption annotations (docs/DATA.md)")
    files = t5.find_encoder_files(encoder_dir)  # Missing files are named before anything is loaded.
    config = t5.T5Config.from_json(pretrained.read_config(files.model_dir, "text encoder"))
    count = int(manifest["num_examples"])
    plan = {
        "encoder": files.root,
        "encoder_digest": t5.checkpoint_digest(files),
        "max_len": max_len,
        "d_model": config.d_model,
        "records_per_shard": records_per_shard,
        "dataset": {"path": data_dir, "kind": manifest["kind"], "num_examples": count,
                    "fingerprint": dataset_fingerprint(manifest)},
    }
    _check_plan(out, plan)

    num_shards = -(-count // records_per_shard)
    names = [_shard_name(i, num_shards) for i in range(num_shards)]
    reports: dict[str, dict | None] = {}
    for name in names:
        done = os.path.join(out, name + ".done.json")
        if os.path.exists(done) and os.path.exists(os.path.join(out, name)):
            with open(done) as f:
                reports[name] = json.load(f)
        else:
            reports[name] = None
    todo = [i for i, name in enumerate(names) if reports[name] is None]
    log(f"[embed_text] {count} captions of {data_dir} -> {out}: {num_shards} shards ({num_shards - len(todo)} "
        f"already done); encoder {files.root} ({config.model_type}, d_model {config.d_model}), max_len {max_len}")
    if todo:
        encoder = t5.TextEncoder.load(encoder_dir, max_len=max_len, batch_size=batch_size)
        records = array_record_data_source.ArrayRecordDataSource(
            [f"{os.path.join(data_dir, s['file'])}[0:{s['num_examples']}]" for s in manifest["shards"]])
        progress = _Progress(sum(min(records_per_shard, count - i * records_per_shard) for i in todo), log)

        def captions_of(i):
            return read_captions(data_dir, i * records_per_shard, min((i + 1) * records_per_shard, count), records)

        # The next shard's captions are read (whole records: JPEG payloads too) while this one encodes.
        with futures.ThreadPoolExecutor(1) as reader:
            pending = reader.submit(captions_of, todo[0])
            for k, i in enumerate(todo):
                captions = pending.result()
                if k + 1 < len(todo):
                    pending = reader.submit(captions_of, todo[k + 1])
                report = _encode_shard(encoder, captions, i * records_per_shard, os.path.join(out, names[i]),
                                       progress)
                _write_json_atomic(os.path.join(out, names[i] + ".done.json"), report)
                reports[names[i]] = report
                progress(0, force=True, note=f" ({k + 1}/{len(todo)} shards this run)")

    ordered = [reports[name] for name in names]
    totals = {k: sum(r[f"num_{k}"] for r in ordered) for k in ("truncated", "empty", "bad")}
    result = {
        "kind": TEXT_KIND,
        "format": "eflow_jax.text_embeddings/v1",
        "num_examples": count,
        "max_len": max_len,
        "d_model": config.d_model,
        "dtype": "bfloat16",
        "encoder": {"path": files.root, "digest": plan["encoder_digest"], "model_type": config.model_type,
                    "num_layers": config.num_layers},
        "dataset": plan["dataset"],
        **{f"num_{k}": v for k, v in totals.items()},
        **{k: [i for r in ordered for i in r[k]][:MAX_LISTED] for k in totals},
        "shards": [{"file": r["file"], "num_examples": r["num_examples"]} for r in ordered],
    }
    _write_json_atomic(os.path.join(out, MANIFEST_NAME), result)
    log(f"[embed_text] done: {count} captions; {totals['truncated']} truncated to {max_len} tokens, "
        f"{totals['empty']} empty and {totals['bad']} unreadable embedded as \"\" (indices in {out}/manifest.json)")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eflow_jax.data.embed_text", description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", required=True, help="T5/UMT5 checkpoint dir, or a diffusers root "
                        "(text_encoder/ + tokenizer/).")
    parser.add_argument("--data", required=True, help="A prepared captioned dataset (clips or latents).")
    parser.add_argument("--out", help="Output dir (default DATA/text_embeddings); rerun to resume.")
    parser.add_argument("--max_len", type=int, default=77, help="Tokens per caption, EOS included.")
    parser.add_argument("--batch", type=int, default=64, help="Captions per encoder call.")
    parser.add_argument("--records_per_shard", type=int, default=4096, help="Unit of resumption.")
    args = parser.parse_args(argv)
    try:
        embed_dataset(args.encoder, args.data, args.out, max_len=args.max_len, batch_size=args.batch,
                      records_per_shard=args.records_per_shard,
                      log=lambda line: print(line, file=sys.stderr, flush=True))
    except (ValueError, FileNotFoundError) as e:  # Bad arguments, files or a mismatched --out: one line.
        sys.exit(f"[embed_text] {e}")


if __name__ == "__main__":
    main()
