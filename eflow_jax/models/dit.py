"""The EFlow video DiT: dense encoder -> token drop -> sparse middle -> restore + fuse -> decoder.

    x_t -> patchify (tile-major order) -> embed -> E encoder blocks (c_trunk) = h_enc
        -> gather kept tokens -> M middle blocks -> scatter back, dropped slots = mask token mu
        -> fuse Linear([restored; h_enc]) -> D decoder blocks (c_dec) -> adaLN final layer -> F

`encode` runs everything up to the fusion, `decode` the decoder and final layer, so objectives
share one trunk pass across several s (METHOD.md 7a). With `decoupled=True` the trunk sees
c_trunk = e_t(t) + e_c(condition) and the decoder c_dec = c_trunk + e_d(t - s); with `decoupled=False`
every block sees c_dec (SoFlow's joint conditioning) and `encode` defers all work to `decode`.
The condition is a class label (e_c: a label table with a learned null row) and/or text (e_c: the
pooled projected text; every trunk block also cross-attends to the text tokens).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from eflow_jax.flow.condition import Condition
from eflow_jax.flow.network import WEAK_PATHS, Network
from eflow_jax.models import attention, tokens
from eflow_jax.models.embed import LabelEmbed, TextEmbed, TimeEmbed, rope_angles
from eflow_jax.models.glga import GATES, GLOBAL_KINDS, MODES, Stack, TokenContext
from eflow_jax.models.layers import AdaLN, Dense, RMSNorm, modulate, swiglu_hidden

# name: (width, heads, (encoder, middle, decoder) depths). METHOD.md 4.1 for B and L.
VARIANTS = {
    "tiny": (64, 2, (1, 2, 1)),
    "S": (384, 6, (2, 8, 2)),
    "B": (768, 12, (2, 8, 2)),
    "L": (1024, 16, (2, 20, 2)),
    "XL": (1152, 16, (2, 24, 2)),
}

MASK_TOKEN_SEED = 20251024  # mu is frozen N(0, 0.02^2) (SPRINT), so it is a constant, not a param.


def model_config(variant: str = "B", **overrides) -> ml_collections.ConfigDict:
    """The model section of a run config; sizes come from VARIANTS[variant]."""
    if variant not in VARIANTS:
        raise ValueError(f"model.variant={variant!r} is unknown; choose one of {sorted(VARIANTS)}.")
    cfg = ml_collections.ConfigDict(dict(
        variant=variant,
        video_shape=(16, 64, 64, 3),  # (T, H, W, C) of the clips (or latents) the model sees.
        num_classes=10,
        patch=(2, 4, 4),
        tile=(4, 4, 4),  # Local-attention tile, in tokens.
        cell=(2, 4, 4),  # Global pooling cell, in tokens.
        drop_group=(1, 2, 2),
        keep_per_group=1,  # 1 of 4 kept: drop ratio 0.75.
        structured_drop=True,
        mode="glga",
        global_kind="pooled",
        gate="sigmoid",
        attention_impl="auto",
        decoupled=True,
        mlp_ratio=4.0,
        dtype="bfloat16",
        remat="none",
        scan_layers=False,
        # Text conditioning: the width of the text encoder's states (0 = class-conditional only) and
        # the most tokens a caption has (the stored embeddings' padded length).
        context_dim=0,
        context_len=77,
    ))
    cfg.update(overrides)
    return cfg


class EFlowDiT(nn.Module):
    """F_theta(x_t, t, s, condition) for videos [B, T, H, W, C]; see the module docstring."""

    config: ml_collections.ConfigDict

    def setup(self):
        cfg = self.config
        width, heads, (n_enc, n_mid, n_dec) = VARIANTS[cfg.variant]
        self.width, self.heads = width, heads
        self.layout = layout_of(cfg)
        dtype = jnp.dtype(cfg.dtype)
        block = dict(width=width, heads=heads, mlp_ratio=cfg.mlp_ratio, mode=cfg.mode,
                     global_kind=cfg.global_kind, gate=cfg.gate, implementation=cfg.attention_impl,
                     dtype=dtype)
        text = cfg.context_dim > 0
        # Cross-attention to the text lives in the trunk (encoder + middle), which one pass shares
        # across every decoder query; with joint conditioning every block sees the text.
        stack = lambda depth, cross: Stack(depth, dict(block, cross=cross), cfg.remat, cfg.scan_layers)  # noqa: E731
        self.patch_embed = Dense(width, ("patch", "embed"), dtype=dtype)
        self.t_embed = TimeEmbed(width)
        self.d_embed = TimeEmbed(width)  # Embeds t - s.
        self.y_embed = LabelEmbed(cfg.num_classes, width) if cfg.num_classes else None
        self.text_embed = TextEmbed(width, cfg.context_dim, dtype) if text else None
        self.encoder, self.middle = stack(n_enc, text), stack(n_mid, text)
        self.decoder = stack(n_dec, text and not cfg.decoupled)
        self.fuse = Dense(width, ("fuse", "embed"), dtype=dtype)
        self.final_adaln = AdaLN(width, 2, dtype)
        self.final_norm = RMSNorm(use_scale=False)
        out_dim = math.prod(cfg.patch) * cfg.video_shape[-1]
        self.final = Dense(out_dim, ("embed", "patch"), dtype=dtype, zero_init=True)
        self.mask_token = jax.random.normal(jax.random.key(MASK_TOKEN_SEED), (width,)) * 0.02

    # ---- the two halves used by objectives ----

    def encode(self, x, t, cond: Condition, keep=None, weak: bool | str = False, s=None, path_drop=None):
        """Trunk tokens for decoder queries at any s (decoupled), or the packed inputs (joint).

        Args:
          x: [B, T, H, W, C]; t: [B]; cond: the condition (labels or text; null samples get the
            learned null label / null text token).
          keep: int32 [B, n_keep] kept token ids (tokens.sample_keep) or None for all tokens.
          weak: False (full path), True or 'drop_middle' (the middle output replaced by mu: the
            weak path of Path-Drop Guidance) or 'skip_half' (STG-style: only the even-indexed
            middle blocks run, dense).
          s: only used with joint conditioning, where the trunk sees s.
          path_drop: optional bool [B]; True replaces that sample's middle output by mu
            (SPRINT's training-time path drop).
        Returns:
          {'h': fused tokens, 'cond': the condition's adaLN vector [B, W], 'text': projected text
          tokens and their lengths, or None}: everything `decode` needs.
        """
        weak = weak_kind(weak)
        if not self.config.decoupled and s is None:
            trunk = {"x": x, "t": t, "cond": cond, "keep": keep, "path_drop": path_drop}
            return trunk | ({f"weak_{weak}": jnp.zeros((0,))} if weak else {})  # The key carries the kind.
        cond_vec, text = self._condition(cond)
        c = self.t_embed(t) + cond_vec + (0 if s is None else self.d_embed(t - s))
        return {"h": self._trunk(x, c, keep, weak, text, path_drop), "cond": cond_vec, "text": text}

    def decode(self, trunk, t, s):
        """F_theta: the decoder blocks and final layer at query time s, [B, T, H, W, C] float32."""
        if "h" not in trunk:  # Joint conditioning: the whole network sees s.
            weak = next((k[len("weak_"):] for k in trunk if k.startswith("weak_")), False)
            trunk = self.encode(trunk["x"], t, trunk["cond"], trunk["keep"], weak, s, trunk["path_drop"])
        c = self.t_embed(t) + trunk["cond"] + self.d_embed(t - s)
        text = trunk["text"] if self.decoder.block["cross"] else None
        h = self.decoder(trunk["h"], c, self._context(None, h_dtype=trunk["h"].dtype), text)
        shift, scale = self.final_adaln(c)
        out = self.final(modulate(self.final_norm(h), shift, scale))
        return tokens.unpatchify(out.astype(jnp.float32), self.layout, self.config.video_shape[-1])

    def __call__(self, x, t, s, cond: Condition, keep=None, weak: bool = False):
        return self.decode(self.encode(x, t, cond, keep, weak), t, s)

    def trunk_tokens(self, x, t, s, cond: Condition, keep=None):
        """The fused tokens the decoder sees (for the decoupling test)."""
        trunk = self.encode(x, t, cond, keep, s=None if self.config.decoupled else s)
        return trunk["h"]

    # ---- internals ----

    def _condition(self, cond: Condition):
        """(adaLN vector [B, W], text (tokens [B, L, W], lengths [B]) or None) of the condition."""
        cfg = self.config
        if (cond.label is None) != (self.y_embed is None) or (cond.text is None) != (self.text_embed is None):
            raise ValueError(
                f"the model takes {'class labels' if self.y_embed else 'no labels'} and "
                f"{'text' if self.text_embed else 'no text'} (model.num_classes={cfg.num_classes}, "
                f"model.context_dim={cfg.context_dim}), but the condition has "
                f"{'labels' if cond.label is not None else 'no labels'} and "
                f"{'text' if cond.text is not None else 'no text'}.")
        vec, text = 0.0, None
        if self.y_embed is not None:
            vec = self.y_embed(cond.labels(cfg.num_classes))
        if self.text_embed is not None:
            pooled, text = self.text_embed(cond.text, cond.text_mask, cond.null)
            vec = vec + pooled
        return vec, text

    def _trunk(self, x, c, keep, weak, text, path_drop):
        dtype = jnp.dtype(self.config.dtype)
        h = self.patch_embed(tokens.patchify(x.astype(dtype), self.layout))
        dense = self._context(None, h.dtype)
        h_enc = self.encoder(h, c, dense, text)
        mu = jnp.broadcast_to(self.mask_token.astype(h.dtype), h.shape)
        if weak == "drop_middle":
            restored = mu
        elif weak == "skip_half":  # Dense, like the other weak path.
            restored = self.middle(h_enc, c, dense, text, only=half_of(self.middle.depth))
        elif keep is None:
            restored = self.middle(h_enc, c, dense, text)
        else:
            mid = self.middle(tokens.gather_tokens(h_enc, keep), c, self._context(keep, h.dtype), text)
            restored = tokens.scatter_tokens(mu, mid, keep)
        if path_drop is not None:
            restored = jnp.where(path_drop[:, None, None], mu, restored)
        return self.fuse(jnp.concatenate([restored, h_enc], axis=-1))

    def _context(self, keep, h_dtype) -> TokenContext:
        layout = self.layout
        coords = jnp.asarray(layout.coords())[None]
        cells = jnp.asarray(layout.cell_ids())[None]
        tiles = jnp.asarray(layout.tile_ids())[None]
        per_tile = layout.tile_size
        if keep is not None:
            coords, cells, tiles = (jnp.take(a[0], keep, axis=0) for a in (coords, cells, tiles))
            # Structured masks keep the same count in every tile (the mask's length / tiles).
            per_tile = keep.shape[1] // layout.num_tiles if self.config.structured_drop else 0
        angles = rope_angles(coords, self.width // self.heads)
        # Cells that are contiguous runs keep that under a structured drop (equal count per cell).
        per_cell = 0
        if layout.cells_contiguous() and (keep is None or self.config.structured_drop):
            per_cell = (layout.num_tokens if keep is None else keep.shape[1]) // layout.num_cells
        return TokenContext(angles, cells, tiles, per_tile, layout.num_cells, per_cell)


def weak_kind(weak: bool | str) -> str | None:
    """None (full path), 'drop_middle' (weak=True) or 'skip_half'."""
    if weak is False or weak is None:
        return None
    kind = "drop_middle" if weak is True else weak
    if kind not in WEAK_PATHS:
        raise ValueError(f"weak={weak!r}; use False, True or one of {WEAK_PATHS} (objective.weak_path).")
    return kind


def half_of(depth: int) -> tuple[int, ...]:
    """The middle blocks the STG-style weak path keeps: every other one, from the first."""
    return tuple(range(0, depth, 2))


def layout_of(cfg: ml_collections.ConfigDict) -> tokens.TokenLayout:
    """Validates the geometry fields of a model config and returns its token layout."""
    for field, choices in (("mode", MODES), ("global_kind", GLOBAL_KINDS), ("gate", GATES)):
        if cfg[field] not in choices:
            raise ValueError(f"model.{field}={cfg[field]!r}; choose one of {choices}.")
    if cfg.variant not in VARIANTS:
        raise ValueError(f"model.variant={cfg.variant!r} is unknown; choose one of {sorted(VARIANTS)}.")
    width, heads, _ = VARIANTS[cfg.variant]
    attention.check_supported(cfg.attention_impl, width // heads, cfg.dtype)
    shape = tuple(cfg.video_shape)
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"model.video_shape={shape}: give 4 positive sizes (frames, height, width, channels), "
                         f"e.g. --config.model.video_shape=(4,16,16,3).")
    t, h, w, _ = shape
    return tokens.validate_layout(t, h, w, tuple(cfg.patch), tuple(cfg.tile), tuple(cfg.cell),
                                  tuple(cfg.drop_group), cfg.keep_per_group)


def make_network(cfg: ml_collections.ConfigDict) -> tuple[EFlowDiT, Network]:
    """The flax module and its pure-function view for objectives and samplers."""
    model = EFlowDiT(cfg)
    layout = layout_of(cfg)
    drops = cfg.keep_per_group < layout.group_size

    # Jitted so that each distinct call (shapes, dtypes, weak path) is traced and lowered once per
    # program: the eflow step repeats its decoder queries at equal shapes, and tracing every
    # application was most of the step's tracing time. XLA inlines the calls, so the compiled
    # program is the same.
    @functools.partial(jax.jit, static_argnums=5)
    def encode(params, x, t, cond, keep, weak):
        return model.apply({"params": params}, x, t, cond, keep, weak, method=EFlowDiT.encode)

    @jax.jit
    def decode(params, trunk, t, s):
        return model.apply({"params": params}, trunk, t, s, method=EFlowDiT.decode)

    def sample_keep(rng, batch):
        return tokens.sample_keep(rng, batch, layout, cfg.structured_drop) if drops else None

    return model, Network(encode, decode, sample_keep, decoupled=cfg.decoupled)


def init_params(model: EFlowDiT, rng: jax.Array, batch: int = 1):
    """Initial params (with logical-axis metadata boxes) from dummy inputs."""
    t, h, w, c = model.config.video_shape
    x = jnp.zeros((batch, t, h, w, c), jnp.float32)
    z = jnp.zeros((batch,), jnp.float32)
    return model.init(rng, x, z, z, dummy_condition(model.config, batch))["params"]


def dummy_condition(cfg: ml_collections.ConfigDict, batch: int) -> Condition:
    """A condition of the kind (and shapes) the model config takes, for init and shape checks."""
    label = jnp.zeros((batch,), jnp.int32) if cfg.num_classes else None
    if not cfg.context_dim:
        return Condition(jnp.zeros((batch,), bool), label=label)
    mask = jnp.ones((batch, cfg.context_len), bool)
    return Condition.of_text(jnp.zeros((batch, cfg.context_len, cfg.context_dim), jnp.float32), mask, label)


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs per sample (matmuls and attention; 2 per multiply-add)."""

    full: float  # Dense full forward (all tokens through the middle).
    dropped: float  # Full forward with the middle on kept tokens.
    weak: float  # Encoder + fusion + decoder (middle skipped).
    decoder: float  # Decoder blocks + final layer only (a decoupled query at a new s).
    middle_dense: float
    middle_dropped: float
    weak_half: float = 0.0  # STG-style weak path: every other middle block, dense.

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def count_flops(cfg: ml_collections.ConfigDict) -> FlopCount:
    """Analytic forward FLOPs per sample of the model described by `cfg`."""
    layout = layout_of(cfg)
    width, heads, (n_enc, n_mid, n_dec) = VARIANTS[cfg.variant]
    n = layout.num_tokens
    patch_dim = math.prod(cfg.patch) * cfg.video_shape[-1]
    hidden = swiglu_hidden(width, cfg.mlp_ratio)

    text_len = cfg.context_len if cfg.context_dim else 0

    def cross(tokens_in: int) -> float:
        """Cross-attention of a block to the (padded) text: q, kv and out projections, attention."""
        return 2 * tokens_in * width * 2 * width + 2 * text_len * width * 2 * width + 4 * tokens_in * text_len * width

    def block(tokens_in: int, per_tile: int, per_cell: int) -> float:
        """per_tile / per_cell 0: ragged tiles (masked attention over all present tokens) / cells
        pooled by a one-hot matmul; else reshapes (GLGA._local, GLGA._global)."""
        linear = 2 * tokens_in * width * (3 * width + width + 3 * hidden)
        if cfg.mode == "full":
            attn = 4 * tokens_in * tokens_in * width
        else:
            attn = 0.0
            if cfg.mode in ("glga", "local_only"):
                attn += 4 * tokens_in * (per_tile or tokens_in) * width
            if cfg.mode in ("glga", "global_only"):
                if cfg.global_kind == "full":
                    attn += 4 * tokens_in * tokens_in * width
                else:  # Pooling (k and v) + attention to the cells.
                    attn += 2 * tokens_in * width if per_cell else 2 * 2 * tokens_in * layout.num_cells * width
                    attn += 4 * tokens_in * layout.num_cells * width
            if cfg.mode == "glga" and cfg.gate != "none":
                attn += 2 * tokens_in * width * 2 * heads
        adaln = 2 * width * 6 * width
        return linear + attn + adaln

    keep = layout.num_keep
    kept_tile = layout.tile_size * layout.keep_per_group // layout.group_size
    embed = 2 * n * patch_dim * width + 4 * 2 * (256 * width + width * width)
    if text_len:  # The text projection (two layers) and the pooled adaLN vector.
        embed += 2 * text_len * (cfg.context_dim * width + width * width) + 2 * width * width
    fuse = 2 * n * 2 * width * width
    final = 2 * n * width * patch_dim + 2 * width * 2 * width
    contiguous = layout.cells_contiguous()
    dense_block = block(n, layout.tile_size, math.prod(cfg.cell) if contiguous else 0)
    if cfg.structured_drop:
        dropped_block = block(keep, kept_tile, keep // layout.num_cells if contiguous else 0)
    else:  # Ragged tiles and cells: masked n_keep^2 local attention, one-hot pooling (GLGA).
        dropped_block = block(keep, 0, 0)
    # Text cross-attention: trunk blocks (encoder, middle), and the decoder's with joint conditioning.
    cross_dense, cross_dropped = (cross(n), cross(keep)) if text_len else (0.0, 0.0)
    dec_cross = 0.0 if cfg.decoupled else cross_dense
    enc, dec = n_enc * (dense_block + cross_dense), n_dec * (dense_block + dec_cross) + final
    mid_dense, mid_dropped = n_mid * (dense_block + cross_dense), n_mid * (dropped_block + cross_dropped)
    return FlopCount(
        full=embed + enc + mid_dense + fuse + dec,
        dropped=embed + enc + mid_dropped + fuse + dec,
        weak=embed + enc + fuse + dec,
        decoder=dec,
        middle_dense=mid_dense,
        middle_dropped=mid_dropped,
        weak_half=embed + enc + len(half_of(n_mid)) * (dense_block + cross_dense) + fuse + dec,
    )
