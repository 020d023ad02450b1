"""The run's text encoder: its config section, loading it once per process, encoding prompts.

Training never runs the encoder (embeddings are precomputed by `python -m eflow_jax.data.embed_text`,
or, for the synthetic captioned set, once per caption at start); sampling by prompt and the text
gauge encode their prompts with the encoder the run names, so prompts land in the space the model
was trained in. `text.encoder` is a checkpoint directory (models/t5.py reads the published
layouts), or 'tiny-random': a small, frozen, randomly initialised encoder written on first use into
the cache (the same loading path as a real checkpoint), for the synthetic captioned set and tests.
"""

from __future__ import annotations

import functools
import os
import tempfile

import ml_collections
import numpy as np

from eflow_jax.models import t5

TINY_RANDOM = "tiny-random"
TINY_RANDOM_VERSION = "v1"  # Bump when the tiny encoder's recipe changes: a new cache dir is written.
TINY_RANDOM_WIDTH = 64  # model.context_dim of runs on the tiny encoder.
# The tiny encoder's SentencePiece vocabulary is trained on these words (the synthetic captions' and a
# few common ones), so captions tokenize into whole words.
TINY_RANDOM_CORPUS = (
    "a an the small large big tiny red green blue yellow purple orange white cyan magenta circle square "
    "triangle diamond cross ring bar star moving left right up down still slowly quickly towards away on "
    "dark background with and of in video clip shape"
).split()


def text_config() -> ml_collections.ConfigDict:
    """A run config's `text` section (text-conditioned runs: model.context_dim > 0)."""
    return ml_collections.ConfigDict(dict(
        # A T5-family checkpoint directory (config.json + *.safetensors + spiece.model, or a diffusers
        # root with text_encoder/ and tokenizer/), or 'tiny-random'. Prompts for --mode=sample and the
        # text gauge are encoded with it; precomputed embeddings must come from the same encoder.
        encoder="",
        cache_dir="",  # Where 'tiny-random' is written ('' = $XDG_CACHE_HOME/eflow_jax or ~/.cache/eflow_jax).
    ))


def encoder_dir(text_cfg: ml_collections.ConfigDict) -> str:
    """The encoder's checkpoint directory; 'tiny-random' is written (atomically) on first use."""
    if not text_cfg.encoder:
        raise ValueError("this run is text-conditioned but names no encoder: set --config.text.encoder=DIR (a "
                         "T5-family checkpoint directory, see docs/T2V.md) or 'tiny-random'.")
    if text_cfg.encoder != TINY_RANDOM:
        return os.path.expanduser(text_cfg.encoder)
    root = text_cfg.cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "eflow_jax")
    path = os.path.join(os.path.expanduser(root), "text_encoders", f"{TINY_RANDOM}-{TINY_RANDOM_VERSION}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tiny-random-", dir=os.path.dirname(path))
        t5.write_random_encoder(tmp, [" ".join(TINY_RANDOM_CORPUS)] * 4 + list(TINY_RANDOM_CORPUS),
                                d_model=TINY_RANDOM_WIDTH, seed=0)
        try:
            os.rename(tmp, path)
        except OSError:  # Another process wrote it first: theirs is the same (deterministic).
            pass
    return path


@functools.lru_cache(maxsize=2)
def _load(directory: str, max_len: int) -> t5.TextEncoder:
    return t5.TextEncoder.load(directory, max_len=max_len)


def load_encoder(config: ml_collections.ConfigDict) -> t5.TextEncoder:
    """The run's encoder (once per process), padded to model.context_len tokens; its width must be
    model.context_dim."""
    encoder = _load(encoder_dir(config.text), int(config.model.context_len))
    if encoder.d_model != config.model.context_dim:
        raise ValueError(f"text encoder {config.text.encoder} has width {encoder.d_model} but "
                         f"model.context_dim={config.model.context_dim}; set model.context_dim={encoder.d_model}.")
    return encoder


def encode_prompts(config: ml_collections.ConfigDict, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(text states [N, L, D] bf16, mask [N, L]) of `prompts` with the run's encoder."""
    return load_encoder(config).encode(list(prompts))


def caption_encoder(config: ml_collections.ConfigDict):
    """What the data pipeline encodes captions with in a text-conditioned run (None for class-conditional runs)."""
    return functools.partial(encode_prompts, config) if config.model.context_dim else None


def read_prompts(sample_cfg: ml_collections.ConfigDict) -> list[str]:
    """The prompts of --sample.prompt (one) or --sample.prompts (a file, one per non-empty line)."""
    if sample_cfg.prompt and sample_cfg.prompts:
        raise ValueError("give --sample.prompt or --sample.prompts, not both.")
    if sample_cfg.prompt:
        return [str(sample_cfg.prompt)]
    if not sample_cfg.prompts:
        return []
    try:
        with open(os.path.expanduser(sample_cfg.prompts), encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise ValueError(f"--sample.prompts={sample_cfg.prompts}: cannot read it ({e.strerror}).") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"--sample.prompts={sample_cfg.prompts} is not UTF-8 text (byte {e.start}); save it as "
                         f"UTF-8.") from e
    if not prompts:
        raise ValueError(f"--sample.prompts={sample_cfg.prompts} holds no prompt (one per line).")
    return prompts
