"""A frozen T5-family text encoder (T5, T5 v1.1 / mT5, UMT5) loaded from a published checkpoint dir.

    encoder = TextEncoder.load("/models/Wan2.1-T2V-1.3B-Diffusers", max_len=512)
    emb, mask = encoder.encode(["a small red circle moving left"])  # [N, L, D], bool [N, L]

Only the encoder stack is built; a full encoder-decoder checkpoint's decoder tensors are never read.
What the three architectures share: token embedding (no scaling), then per block
    x += Attention(RMSNorm(x)),  x += FeedForward(RMSNorm(x)),
then a final RMSNorm. T5's quirks, all reproduced here:
  * RMSNorm without mean subtraction, computed in float32 (`layers.RMSNorm`);
  * attention logits are NOT scaled by 1/sqrt(d_kv) (the scale is folded into the init of q);
  * a learned bias per (head, relative-position bucket) is added to the logits; buckets are
    bidirectional: exact for small offsets, logarithmic up to `relative_attention_max_distance`.
    T5 / mT5 learn one table in block 0 and every block reuses it; UMT5 learns one per block;
  * feed-forward: 'relu' (original T5: wi -> relu -> wo) or 'gated-gelu' (v1.1, mT5, UMT5:
    gelu_new(wi_0 x) * wi_1 x -> wo; gelu_new is the tanh approximation).
Padding positions are masked as keys; their own outputs are computed but zeroed by `encode`.

Checkpoint layouts accepted by `TextEncoder.load(DIR)`:
  (a) DIR/config.json + DIR/*.safetensors (sharded with an index, or not) + DIR/spiece.model;
  (b) a diffusers pipeline root: DIR/text_encoder/{config.json, *.safetensors} and
      DIR/tokenizer/spiece.model (how Wan 2.1 ships umt5-xxl).
Weights are read by `pretrained` (numpy, memory-mapped). docs/T2V.md says which checkpoints to use.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from eflow_jax.models import pretrained
from eflow_jax.models.layers import Dense, RMSNorm

TOKENIZER_FILE = "spiece.model"
MODEL_TYPES = ("t5", "mt5", "umt5")
_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The encoder fields of a T5/mT5/UMT5 config.json (Hugging Face names in comments)."""

    vocab_size: int
    d_model: int
    d_kv: int
    num_heads: int
    num_layers: int
    d_ff: int
    feed_forward_proj: str = "relu"
    num_buckets: int = 32  # relative_attention_num_buckets
    max_distance: int = 128  # relative_attention_max_distance
    layer_norm_epsilon: float = 1e-6
    model_type: str = "t5"

    @classmethod
    def from_json(cls, cfg: Mapping[str, Any], where: str = "config.json") -> T5Config:
        """From a parsed config.json; errors name the file and the missing or unsupported field."""
        required = ("vocab_size", "d_model", "d_kv", "num_heads", "num_layers", "d_ff")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ValueError(f"{where} lacks {missing}: not a T5-family config (model_type "
                             f"{cfg.get('model_type')!r})")
        model_type = cfg.get("model_type", "t5")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"{where}: model_type {model_type!r} is not a T5-family encoder ({MODEL_TYPES})")
        config = cls(
            vocab_size=int(cfg["vocab_size"]), d_model=int(cfg["d_model"]), d_kv=int(cfg["d_kv"]),
            num_heads=int(cfg["num_heads"]), num_layers=int(cfg["num_layers"]), d_ff=int(cfg["d_ff"]),
            feed_forward_proj=cfg.get("feed_forward_proj", "relu"),
            num_buckets=int(cfg.get("relative_attention_num_buckets", 32)),
            max_distance=int(cfg.get("relative_attention_max_distance", 128)),
            layer_norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-6)),
            model_type=model_type,
        )
        parts = config.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or config.activation not in _ACTIVATIONS:
            raise ValueError(f"{where}: feed_forward_proj {config.feed_forward_proj!r} is not supported "
                             f"('ACT' or 'gated-ACT', ACT in {sorted(_ACTIVATIONS)})")
        return config

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        # As in the reference: 'gated-gelu' means the tanh approximation (gelu_new).
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    @property
    def bias_per_layer(self) -> bool:
        """UMT5 learns a relative-position bias in every block; T5 and mT5 share block 0's."""
        return self.model_type == "umt5"


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucket of every (query, key) pair, int32 [length, length].

    Half the buckets are for keys after the query; within each half, offsets below half of it get
    one bucket each and the rest are binned logarithmically up to max_distance (beyond: the last).
    Computed in float32 like the reference, so boundary offsets land in the same bucket.
    """
    offset = np.arange(length)[None, :] - np.arange(length)[:, None]  # key - query
    half = num_buckets // 2
    bucket = (offset > 0).astype(np.int64) * half
    distance = np.abs(offset)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        log_ratio = np.log(distance.astype(np.float32) / np.float32(max_exact))
    scaled = log_ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = max_exact + np.where(distance < max_exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (bucket + np.where(distance < max_exact, distance, large)).astype(np.int32)


class RelativeBias(nn.Module):
    """Learned attention-logit bias per head and relative-position bucket -> float32 [H, L, L]."""

    num_buckets: int
    max_distance: int
    num_heads: int

    @nn.compact
    def __call__(self, length: int) -> jax.Array:
        table_rh = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "heads")),
            (self.num_buckets, self.num_heads))
        buckets_qk = relative_position_buckets(length, self.num_buckets, self.max_distance)
        return jnp.take(table_rh, buckets_qk, axis=0).transpose(2, 0, 1).astype(jnp.float32)


class SelfAttention(nn.Module):
    """Multi-head self-attention with an additive bias and padding keys masked; logits unscaled."""

    num_heads: int
    d_kv: int
    d_model: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x_bld: jax.Array, bias_hqk: jax.Array, mask_bl: jax.Array) -> jax.Array:
        def proj(name):
            return Dense((self.num_heads, self.d_kv), ("embed", "heads", "kv"), dtype=self.dtype,
                         use_bias=False, name=name)(x_bld)

        # Plain XLA attention, not models.attention.attend: T5 needs an additive per-head bias and
        # unscaled logits, and this encoder runs offline on short sequences (embed_text).
        q_bqhd, k_bkhd, v_bkhd = proj("q"), proj("k"), proj("v")
        # No 1/sqrt(d_kv): T5 folds it into q's initialisation, the checkpoints expect raw q.k.
        logits_bhqk = jnp.einsum("bqhd,bkhd->bhqk", q_bqhd, k_bkhd, preferred_element_type=jnp.float32)
        logits_bhqk = logits_bhqk + bias_hqk[None]
        logits_bhqk = jnp.where(mask_bl[:, None, None, :], logits_bhqk, jnp.finfo(jnp.float32).min)
        probs_bhqk = jax.nn.softmax(logits_bhqk, axis=-1).astype(self.dtype)
        out_bqhd = jnp.einsum("bhqk,bkhd->bqhd", probs_bhqk, v_bkhd)
        return Dense(self.d_model, ("heads", "kv", "embed"), axis=(-2, -1), dtype=self.dtype,
                     use_bias=False, name="o")(out_bqhd)


class FeedForward(nn.Module):
    """wo(act(wi x)) or, gated, wo(act(wi_0 x) * wi_1 x); no biases."""

    d_ff: int
    d_model: int
    activation: str
    gated: bool
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x_bld: jax.Array) -> jax.Array:
        def dense(name, features, axes, x):
            return Dense(features, axes, dtype=self.dtype, use_bias=False, name=name)(x)

        act = _ACTIVATIONS[self.activation]
        if self.gated:
            gate_blf = act(dense("wi_0", self.d_ff, ("embed", "mlp"), x_bld))
            h_blf = gate_blf * dense("wi_1", self.d_ff, ("embed", "mlp"), x_bld)
        else:
            h_blf = act(dense("wi", self.d_ff, ("embed", "mlp"), x_bld))
        return dense("wo", self.d_model, ("mlp", "embed"), h_blf)


class EncoderBlock(nn.Module):
    """Pre-norm attention and feed-forward residuals; a block with `own_bias` computes the bias."""

    config: T5Config
    own_bias: bool
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x_bld, bias_hqk, mask_bl):
        cfg = self.config
        if self.own_bias:
            bias_hqk = RelativeBias(cfg.num_buckets, cfg.max_distance, cfg.num_heads,
                                    name="rel_bias")(x_bld.shape[1])
        h = RMSNorm(eps=cfg.layer_norm_epsilon, name="attn_norm")(x_bld)
        x_bld = x_bld + SelfAttention(cfg.num_heads, cfg.d_kv, cfg.d_model, self.dtype, name="attention")(
            h, bias_hqk, mask_bl)
        h = RMSNorm(eps=cfg.layer_norm_epsilon, name="mlp_norm")(x_bld)
        x_bld = x_bld + FeedForward(cfg.d_ff, cfg.d_model, cfg.activation, cfg.gated, self.dtype, name="mlp")(h)
        return x_bld, bias_hqk


class T5Encoder(nn.Module):
    """token ids [B, L] + key mask [B, L] -> hidden states [B, L, d_model] (padding rows not zeroed)."""

    config: T5Config
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, ids_bl: jax.Array, mask_bl: jax.Array) -> jax.Array:
        cfg = self.config
        init = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed"))
        table_vd = self.param("embedding", init, (cfg.vocab_size, cfg.d_model))
        x_bld = jnp.take(table_vd, ids_bl, axis=0).astype(self.dtype)
        bias_hqk = None
        for i in range(cfg.num_layers):
            own_bias = i == 0 or cfg.bias_per_layer
            x_bld, bias_hqk = EncoderBlock(cfg, own_bias, self.dtype, name=f"block_{i}")(x_bld, bias_hqk, mask_bl)
        return RMSNorm(eps=cfg.layer_norm_epsilon, name="final_norm")(x_bld)


# ---------------------------------------------------------------------------------------------
# Checkpoint files -> params
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EncoderFiles:
    """Where the parts of an encoder checkpoint are (after resolving the two accepted layouts)."""

    root: str  # The directory given.
    model_dir: str  # Holds config.json and the safetensors.
    tokenizer: str  # The SentencePiece model.
    weights: tuple[str, ...]


def find_encoder_files(directory: str | os.PathLike) -> EncoderFiles:
    """Resolves layout (a) DIR/{config.json,*.safetensors,spiece.model} or (b) a diffusers root
    DIR/text_encoder/ + DIR/tokenizer/; raises CheckpointDirError naming the first missing file."""
    root = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(root):
        raise pretrained.CheckpointDirError(f"text encoder directory {root} does not exist: download the "
                                            f"checkpoint (config.json, *.safetensors, {TOKENIZER_FILE}) into it.")
    model_dir, tokenizer_dir = root, root
    if os.path.isdir(os.path.join(root, "text_encoder")):  # A diffusers pipeline (e.g. Wan 2.1).
        model_dir, tokenizer_dir = os.path.join(root, "text_encoder"), os.path.join(root, "tokenizer")
    pretrained.read_config(model_dir, "text encoder")  # Raises naming config.json.
    weights = pretrained.safetensors_files(model_dir, "text encoder")
    tokenizer = os.path.join(tokenizer_dir, TOKENIZER_FILE)
    if not os.path.isfile(tokenizer):
        raise pretrained.CheckpointDirError(
            f"{tokenizer} is missing: the SentencePiece tokenizer of this checkpoint is needed (the "
            f"tokenizer's {TOKENIZER_FILE}, beside config.json or in a diffusers root's tokenizer/).")
    return EncoderFiles(root, model_dir, tokenizer, tuple(weights))


def checkpoint_digest(files: EncoderFiles) -> str:
    """sha256 over config.json, the weight files' names and sizes and the tokenizer model's bytes:
    cheap (no weights read), and it changes when the checkpoint does."""
    digest = hashlib.sha256()
    with open(os.path.join(files.model_dir, "config.json"), "rb") as f:
        digest.update(f.read())
    for path in files.weights:
        digest.update(f"{os.path.basename(path)}\t{os.path.getsize(path)}\n".encode())
    with open(files.tokenizer, "rb") as f:
        digest.update(f.read())
    return digest.hexdigest()


def _encoder_tensor_names(cfg: T5Config) -> dict[tuple[str, ...], tuple[str, str]]:
    """Our param path -> (checkpoint tensor name, how to lay it out)."""
    names: dict[tuple[str, ...], tuple[str, str]] = {}
    for i in range(cfg.num_layers):
        hf, ours = f"encoder.block.{i}.layer.", (f"block_{i}",)
        for p in "qkv":
            names[ours + ("attention", p, "kernel")] = (f"{hf}0.SelfAttention.{p}.weight", "in_heads")
        names[ours + ("attention", "o", "kernel")] = (f"{hf}0.SelfAttention.o.weight", "out_heads")
        if i == 0 or cfg.bias_per_layer:
            names[ours + ("rel_bias", "embedding")] = (f"{hf}0.SelfAttention.relative_attention_bias.weight", "copy")
        names[ours + ("attn_norm", "scale")] = (f"{hf}0.layer_norm.weight", "copy")
        for p in ("wi_0", "wi_1", "wo") if cfg.gated else ("wi", "wo"):
            names[ours + ("mlp", p, "kernel")] = (f"{hf}1.DenseReluDense.{p}.weight", "transpose")
        names[ours + ("mlp_norm", "scale")] = (f"{hf}1.layer_norm.weight", "copy")
    names[("final_norm", "scale")] = ("encoder.final_layer_norm.weight", "copy")
    return names


def params_from_tensors(tensors: Mapping[str, np.ndarray], cfg: T5Config, dtype=jnp.float32,
                        where: str = "checkpoint") -> dict:
    """Checkpoint tensors (HF names, torch [out, in] layout) -> our params tree, on the device.

    The embedding is 'encoder.embed_tokens.weight' or else 'shared.weight'; decoder tensors and
    anything else not named here are ignored. Raises ValueError naming a missing or misshaped tensor.
    """
    h, dk, d = cfg.num_heads, cfg.d_kv, cfg.d_model
    names = _encoder_tensor_names(cfg)
    embed = next((n for n in ("encoder.embed_tokens.weight", "shared.weight") if n in tensors), None)
    if embed is None:
        raise ValueError(f"{where} has neither 'encoder.embed_tokens.weight' nor 'shared.weight': not a T5 encoder")
    names[("embedding",)] = (embed, "copy")
    expected = jax.eval_shape(lambda: T5Encoder(cfg).init(
        jax.random.key(0), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), bool)))["params"]
    expected = nn.unbox(expected)
    params: dict = {}
    for path, (name, layout) in names.items():
        if name not in tensors:
            raise ValueError(f"{where} lacks tensor {name!r} (config: model_type {cfg.model_type!r}, "
                             f"{cfg.num_layers} layers, feed_forward_proj {cfg.feed_forward_proj!r})")
        w = tensors[name]
        if layout == "in_heads":  # [H*dk, d] -> [d, H, dk]
            w = w.T.reshape(d, h, dk) if w.shape == (h * dk, d) else w
        elif layout == "out_heads":  # [d, H*dk] -> [H, dk, d]
            w = w.T.reshape(h, dk, d) if w.shape == (d, h * dk) else w
        elif layout == "transpose":
            w = w.T
        want = functools.reduce(lambda tree, key: tree[key], path, expected).shape
        if tuple(w.shape) != tuple(want):
            raise ValueError(f"{where}: tensor {name!r} has shape {list(tensors[name].shape)}, which does "
                             f"not fit the config (expected {list(want)} after layout)")
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(np.asarray(w), dtype)  # One tensor at a time: host peak ~ one tensor.
    return params


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


class Tokens(NamedTuple):
    ids: np.ndarray  # int32 [N, max_len], pad id after the EOS.
    mask: np.ndarray  # bool [N, max_len], a prefix of Trues (the text's pieces and its EOS).
    truncated: np.ndarray  # bool [N]: the text had more than max_len - 1 pieces.


class Tokenizer:
    """The checkpoint's SentencePiece model, used as T5's tokenizer: pieces, then EOS, then pads.

    Matches transformers' T5Tokenizer (`tokenizer(texts, max_length=L, truncation=True,
    padding='max_length')`) on plain text. It does not parse special-token strings inside the
    text ('</s>', '<extra_id_0>'): those are tokenized as ordinary characters.
    """

    def __init__(self, path: str | os.PathLike):
        import sentencepiece  # Imported here: only text-encoding code paths need it.

        self.path = os.fspath(path)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:
            raise pretrained.CheckpointDirError(f"{self.path} is not a readable SentencePiece model ({e}); "
                                                "download it again.") from e
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else self._sp.piece_to_id("</s>")
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0
        self.vocab_size = self._sp.get_piece_size()

    def __call__(self, texts: Sequence[str], max_len: int) -> Tokens:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not one string")
        n = len(texts)
        ids = np.full((n, max_len), self.pad_id, np.int32)
        mask = np.zeros((n, max_len), bool)
        truncated = np.zeros(n, bool)
        for i, pieces in enumerate(self._sp.encode(list(texts))):
            truncated[i] = len(pieces) > max_len - 1
            row = pieces[: max_len - 1] + [self.eos_id]  # The EOS stays last, as the reference truncates.
            ids[i, : len(row)] = row
            mask[i, : len(row)] = True
        return Tokens(ids, mask, truncated)


# ---------------------------------------------------------------------------------------------
# The encoder people use
# ---------------------------------------------------------------------------------------------


def _encode_fn(module: T5Encoder, params, ids_bl, mask_bl):
    x_bld = module.apply({"params": params}, ids_bl, mask_bl)
    return jnp.where(mask_bl[..., None], x_bld, 0).astype(x_bld.dtype)


class TextEncoder:
    """Frozen T5-family encoder + tokenizer: `encode(texts) -> (embeddings [N, L, D], mask [N, L])`.

    Texts are encoded `batch_size` at a time with one compiled program per (batch_size, max_len)
    (the last batch is padded to that shape). Embeddings come back as numpy in `dtype` (bfloat16
    numpy arrays are ml_dtypes'), zero at padding positions.
    """

    def __init__(self, *, config: T5Config, params: dict, tokenizer: Tokenizer, max_len: int,
                 dtype=jnp.bfloat16, batch_size: int = 64, files: EncoderFiles | None = None):
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces but the encoder embeds only "
                             f"{config.vocab_size}: tokenizer and weights are from different checkpoints")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config, self.params, self.tokenizer = config, params, tokenizer
        self.max_len, self.dtype, self.batch_size, self.files = max_len, dtype, batch_size, files
        self.module = T5Encoder(config, dtype=dtype)
        # The params are an argument, never closed over (they would become constants in the program).
        self._encode = jax.jit(functools.partial(_encode_fn, self.module))

    @classmethod
    def load(cls, directory: str | os.PathLike, *, max_len: int = 77, dtype=jnp.bfloat16,
             batch_size: int = 64) -> TextEncoder:
        """Loads layout (a) or (b) (module docstring) with no network; errors name the missing file.

        Args:
            directory: checkpoint dir or diffusers pipeline root.
            max_len: tokens per text, EOS included (longer texts are truncated, keeping the EOS).
            dtype: compute and parameter dtype (float32 for exactness, bfloat16 to halve memory).
            batch_size: texts per compiled call.
        """
        files = find_encoder_files(directory)
        config = T5Config.from_json(pretrained.read_config(files.model_dir, "text encoder"),
                                    os.path.join(files.model_dir, "config.json"))
        tokenizer = Tokenizer(files.tokenizer)
        tensors = pretrained.read_tensors(files.model_dir, "text encoder")  # Memory-mapped: the decoder is never read.
        params = params_from_tensors(tensors, config, dtype, where=f"text encoder {files.model_dir}")
        return cls(config=config, params=params, tokenizer=tokenizer, max_len=max_len, dtype=dtype,
                   batch_size=batch_size, files=files)

    @property
    def d_model(self) -> int:
        return self.config.d_model

    def tokenize(self, texts: Sequence[str]) -> Tokens:
        """ids, mask and per-text `truncated` flags (texts longer than max_len - 1 pieces)."""
        return self.tokenizer(texts, self.max_len)

    def encode_tokens(self, tokens: Tokens) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings [N, max_len, d_model] (dtype, zero at padding) and the mask bool [N, max_len]."""
        n, b = len(tokens.ids), self.batch_size
        out = np.zeros((n, self.max_len, self.d_model), jnp.dtype(self.dtype))
        pending = None  # The previous batch is copied out while this one runs (dispatch is asynchronous).
        for start in range(0, n, b):
            ids, mask = tokens.ids[start : start + b], tokens.mask[start : start + b]
            if len(ids) < b:  # Pad to the compiled shape with EOS-only rows.
                fill = b - len(ids)
                ids = np.concatenate([ids, np.full((fill, self.max_len), self.tokenizer.pad_id, np.int32)])
                mask = np.concatenate([mask, np.zeros((fill, self.max_len), bool)])
                ids[-fill:, 0], mask[-fill:, 0] = self.tokenizer.eos_id, True
            result = self._encode(self.params, ids, mask)
            if pending is not None:
                out[pending[0] : pending[0] + b] = np.asarray(pending[1])
            pending = (start, result)
        if pending is not None:
            out[pending[0] :] = np.asarray(pending[1])[: n - pending[0]]
        return out, tokens.mask.copy()

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings [N, max_len, d_model], mask bool [N, max_len]); see `tokenize` for truncation."""
        tokens = self.tokenize(texts)
        if tokens.truncated.any():
            logging.warning("text encoder: %d of %d texts were longer than max_len=%d tokens and truncated",
                            int(tokens.truncated.sum()), len(texts), self.max_len)
        return self.encode_tokens(tokens)


# ---------------------------------------------------------------------------------------------
# A tiny random encoder in the published layout (synthetic captioned data, tests)
# ---------------------------------------------------------------------------------------------


def write_random_encoder(directory: str | os.PathLike, corpus: Sequence[str], *, d_model: int = 64,
                         num_layers: int = 2, num_heads: int = 4, d_ff: int | None = None,
                         vocab_size: int = 256, seed: int = 0, model_type: str = "umt5",
                         feed_forward_proj: str | None = None, num_buckets: int = 32,
                         max_distance: int = 128) -> str:
    """Writes a tiny, randomly initialised, deterministic encoder checkpoint dir; returns its path.

    The files are those of a published encoder-only checkpoint (config.json, model.safetensors in
    the T5EncoderModel / UMT5EncoderModel layout, spiece.model trained on `corpus`), so it loads
    through exactly the code path of a real one (and with transformers too). Same arguments ->
    identical files.

    Args:
        directory: created if needed; existing files of these names are replaced.
        corpus: texts to train the SentencePiece model on (e.g. the dataset's captions).
        vocab_size: SentencePiece target; a small corpus may give fewer pieces (the embedding
          table is then the piece count rounded up to a multiple of 8).
        model_type: 'umt5' (a bias per block), 't5' or 'mt5' (block 0's bias shared).
        feed_forward_proj: default 'gated-gelu', or 'relu' for model_type 't5'.
    """
    import sentencepiece

    corpus = [t for t in corpus if t and t.strip()]
    if not corpus:
        raise ValueError("write_random_encoder needs a non-empty corpus to train the tokenizer on")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    feed_forward_proj = feed_forward_proj or ("relu" if model_type == "t5" else "gated-gelu")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    model = io.BytesIO()
    # T5's id convention (pad 0, eos 1, unk 2, no bos); one thread and no sampling: deterministic.
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        hard_vocab_limit=False, character_coverage=1.0, num_threads=1, minloglevel=2)
    pieces = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    d_kv = d_model // num_heads
    config = {
        "architectures": ["UMT5EncoderModel" if model_type == "umt5" else "T5EncoderModel"],
        "model_type": model_type, "vocab_size": -(-pieces // 8) * 8, "d_model": d_model, "d_kv": d_kv,
        "num_heads": num_heads, "num_layers": num_layers, "d_ff": d_ff or 2 * d_model,
        "feed_forward_proj": feed_forward_proj, "relative_attention_num_buckets": num_buckets,
        "relative_attention_max_distance": max_distance, "layer_norm_epsilon": 1e-6,
        "dropout_rate": 0.0, "pad_token_id": 0, "eos_token_id": 1, "is_encoder_decoder": False,
        "tie_word_embeddings": False, "initializer_factor": 1.0,
    }
    cfg = T5Config.from_json(config)
    rng = np.random.default_rng(seed)

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    h_dk = num_heads * d_kv
    tensors = {"shared.weight": normal((cfg.vocab_size, d_model), 1.0),
               "encoder.final_layer_norm.weight": np.ones(d_model, np.float32)}
    for i in range(num_layers):
        p = f"encoder.block.{i}.layer."
        tensors[p + "0.SelfAttention.q.weight"] = normal((h_dk, d_model), (d_model * d_kv) ** -0.5)
        tensors[p + "0.SelfAttention.k.weight"] = normal((h_dk, d_model), d_model ** -0.5)
        tensors[p + "0.SelfAttention.v.weight"] = normal((h_dk, d_model), d_model ** -0.5)
        tensors[p + "0.SelfAttention.o.weight"] = normal((d_model, h_dk), h_dk ** -0.5)
        if i == 0 or cfg.bias_per_layer:
            tensors[p + "0.SelfAttention.relative_attention_bias.weight"] = normal((num_buckets, num_heads), 0.5)
        tensors[p + "0.layer_norm.weight"] = np.ones(d_model, np.float32)
        for name in ("wi_0", "wi_1") if cfg.gated else ("wi",):
            tensors[p + f"1.DenseReluDense.{name}.weight"] = normal((cfg.d_ff, d_model), d_model ** -0.5)
        tensors[p + "1.DenseReluDense.wo.weight"] = normal((d_model, cfg.d_ff), cfg.d_ff ** -0.5)
        tensors[p + "1.layer_norm.weight"] = np.ones(d_model, np.float32)
    pretrained.write_safetensors(os.path.join(directory, "model.safetensors"), tensors)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=1, sort_keys=True)
    with open(os.path.join(directory, TOKENIZER_FILE), "wb") as f:
        f.write(model.getvalue())
    return directory
