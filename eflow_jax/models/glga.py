"""Gated Local-Global Attention (GLGA) and the adaLN-Zero transformer block (docs/METHOD.md 4.3).

For each head: a local branch attends within non-overlapping 3D tiles (tiles are a batch
dimension of one attention call), a global branch attends to per-cell mean keys/values
(or, by config, to all present tokens), and two query-dependent sigmoid gates mix them:
    GLGA(u) = W_o concat_h(g_loc,h * O_loc,h + g_glb,h * O_glb,h),  [g_loc, g_glb] = sigmoid(u W_g + b_g).
Tile and cell membership come from each token's original coordinates, so the same block
runs on all N tokens or on the kept subset of a structured drop.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from eflow_jax.models.attention import attend
from eflow_jax.models.embed import apply_rope
from eflow_jax.models.layers import AdaLN, Dense, RMSNorm, SwiGLU, modulate

MODES = ("glga", "local_only", "global_only", "full")
GLOBAL_KINDS = ("pooled", "full")
GATES = ("sigmoid", "convex", "none")


@flax.struct.dataclass
class TokenContext:
    """Where the tokens of one pass sit: RoPE angles, pooling-cell ids, tile ids.

    Attributes:
      angles: float32 [B, n, head_dim / 2] RoPE angles at the tokens' original coordinates.
      cell_ids: int32 [B, n] pooling cell of each token.
      tile_ids: int32 [B, n] tile of each token (used only when tiles are ragged).
      tokens_per_tile: tokens of each tile, present in this pass (equal for every tile),
        or 0 when tiles are ragged (unstructured drop): then local attention is masked.
      num_cells: number of pooling cells on the full grid.
      tokens_per_cell: present tokens of each cell when every cell is one contiguous run of that
        many tokens (pooling is then a reshape-mean), or 0: pooling by a one-hot matmul.
    """

    angles: jax.Array
    cell_ids: jax.Array
    tile_ids: jax.Array
    tokens_per_tile: int = flax.struct.field(pytree_node=False)
    num_cells: int = flax.struct.field(pytree_node=False)
    tokens_per_cell: int = flax.struct.field(pytree_node=False, default=0)


class GLGA(nn.Module):
    """Gated Local-Global Attention over the tokens of one pass."""

    width: int
    heads: int
    mode: str = "glga"
    global_kind: str = "pooled"
    gate: str = "sigmoid"
    implementation: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, u_bnd: jax.Array, ctx: TokenContext) -> jax.Array:
        head_dim = self.width // self.heads
        qkv = Dense((3, self.heads, head_dim), ("embed", None, "heads", "kv"), dtype=self.dtype,
                    name="qkv")(u_bnd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = RMSNorm(axis_name="kv", name="q_norm")(q)
        k = RMSNorm(axis_name="kv", name="k_norm")(k)
        q, k = apply_rope(q, ctx.angles), apply_rope(k, ctx.angles)

        if self.mode == "full":
            out = attend(q, k, v, implementation=self.implementation)
        else:
            branches = []
            if self.mode in ("glga", "local_only"):
                branches.append(self._local(q, k, v, ctx))
            if self.mode in ("glga", "global_only"):
                branches.append(self._global(q, k, v, ctx))
            out = self._gated_sum(u_bnd, branches)
        return Dense(self.width, ("heads", "kv", "embed"), axis=(-2, -1), dtype=self.dtype,
                     name="out")(out)

    def _local(self, q, k, v, ctx: TokenContext) -> jax.Array:
        b, n, h, d = q.shape
        if ctx.tokens_per_tile == 0:  # Ragged tiles: block-diagonal mask over all present tokens.
            tiles = jnp.broadcast_to(ctx.tile_ids, (b, n))
            mask = tiles[:, None, :, None] == tiles[:, None, None, :]
            return attend(q, k, v, implementation=_masked_impl(self.implementation), mask=mask)
        p = ctx.tokens_per_tile
        fold = lambda a: a.reshape(b * (n // p), p, h, d)  # noqa: E731 (tiles -> batch)
        return attend(fold(q), fold(k), fold(v), implementation=self.implementation).reshape(b, n, h, d)

    def _global(self, q, k, v, ctx: TokenContext) -> jax.Array:
        if self.global_kind == "full":
            return attend(q, k, v, implementation=self.implementation)
        # Summary keys/values: mean of the present post-RoPE keys/values of each cell.
        if ctx.tokens_per_cell:
            k_bar, v_bar = pool_cells(k, ctx.tokens_per_cell), pool_cells(v, ctx.tokens_per_cell)
            return attend(q, k_bar, v_bar, implementation=self.implementation)
        k_bar, v_bar, counts = pool_cells_onehot(k, v, ctx.cell_ids, ctx.num_cells)
        if ctx.tokens_per_tile == 0:  # Unstructured drop can empty a cell: never attend to it.
            mask = jnp.broadcast_to((counts > 0)[:, None, None, :], (q.shape[0], 1, q.shape[1], counts.shape[1]))
            return attend(q, k_bar, v_bar, implementation=_masked_impl(self.implementation), mask=mask)
        return attend(q, k_bar, v_bar, implementation=self.implementation)

    def _gated_sum(self, u_bnd, branches: list[jax.Array]) -> jax.Array:
        if len(branches) == 1 or self.gate == "none":
            return sum(branches)
        n_gates = 1 if self.gate == "convex" else 2
        logits = Dense((n_gates, self.heads), ("embed", None, "heads"), dtype=self.dtype, zero_init=True,
                       name="gate")(u_bnd)
        g = jax.nn.sigmoid(logits.astype(jnp.float32)).astype(branches[0].dtype)[..., None]  # [B,n,G,H,1]
        if self.gate == "convex":
            return g[:, :, 0] * branches[0] + (1 - g[:, :, 0]) * branches[1]
        return g[:, :, 0] * branches[0] + g[:, :, 1] * branches[1]


def pool_cells(a: jax.Array, per_cell: int) -> jax.Array:
    """Per-cell means of [B, n, H, D] stored as contiguous runs of `per_cell` tokens -> [B, n / per_cell, H, D].

    O(n D), against O(n C D) for the one-hot matmul; the cells come out in token order, which the
    softmax over cells does not see.
    """
    b, n, h, d = a.shape
    return jnp.mean(a.reshape(b, n // per_cell, per_cell, h, d), axis=2).astype(a.dtype)


def pool_cells_onehot(k: jax.Array, v: jax.Array, cell_ids: jax.Array, num_cells: int):
    """Per-cell means by a one-hot matmul, for layouts whose cells are not contiguous runs (and
    ragged, unstructured drops). Returns (k_bar, v_bar [B, C, H, D], counts [B, C])."""
    cells = jnp.broadcast_to(cell_ids, k.shape[:2])
    onehot = jax.nn.one_hot(cells, num_cells, dtype=k.dtype)  # [B, n, C]
    counts = jnp.sum(onehot.astype(jnp.float32), axis=1)  # [B, C]
    inv = (1.0 / jnp.maximum(counts, 1.0)).astype(k.dtype)[:, :, None, None]
    k_bar = jnp.einsum("bnc,bnhd->bchd", onehot, k) * inv
    v_bar = jnp.einsum("bnc,bnhd->bchd", onehot, v) * inv
    return k_bar, v_bar, counts


def _masked_impl(implementation: str) -> str:
    # The masked fallback is an ablation path; cuDNN takes masks too, splash does not.
    return "xla" if implementation == "splash" else implementation


class CrossAttention(nn.Module):
    """Queries from video tokens (the kept ones, under token drop), keys/values from the text tokens."""

    width: int
    heads: int
    implementation: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, u_bnd: jax.Array, text) -> jax.Array:
        """text: (tokens [B, L, W], lengths int32 [B]): the first `length` tokens are attended to."""
        tokens_blw, lengths = text
        head_dim = self.width // self.heads
        q = Dense((self.heads, head_dim), ("embed", "heads", "kv"), dtype=self.dtype, name="q")(u_bnd)
        kv = Dense((2, self.heads, head_dim), ("embed", None, "heads", "kv"), dtype=self.dtype,
                   name="kv")(tokens_blw)
        q = RMSNorm(axis_name="kv", name="q_norm")(q)
        k = RMSNorm(axis_name="kv", name="k_norm")(kv[:, :, 0])
        out = attend(q, k, kv[:, :, 1], implementation=self.implementation, kv_lengths=lengths)
        return Dense(self.width, ("heads", "kv", "embed"), axis=(-2, -1), dtype=self.dtype, zero_init=True,
                     name="out")(out)


class Block(nn.Module):
    """adaLN-Zero block: x += a1 * GLGA(mod(norm(x))); [x += CrossAttn(norm(x), text)]; x += a2 * SwiGLU(mod(norm(x))).

    cross: the block cross-attends to the text (the cross-attention starts as the identity: its
    output projection is zero-initialised).
    """

    width: int
    heads: int
    mlp_ratio: float = 4.0
    mode: str = "glga"
    global_kind: str = "pooled"
    gate: str = "sigmoid"
    implementation: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    cross: bool = False

    @nn.compact
    def __call__(self, x, c_bd, ctx: TokenContext, text=None):
        shift1, scale1, gate1, shift2, scale2, gate2 = AdaLN(self.width, 6, self.dtype, name="adaln")(c_bd)
        u = modulate(RMSNorm(use_scale=False)(x), shift1, scale1)
        x = x + gate1[:, None] * GLGA(self.width, self.heads, self.mode, self.global_kind, self.gate,
                                      self.implementation, self.dtype, name="attn")(u, ctx)
        if self.cross:
            if text is None:
                raise ValueError("this block cross-attends to text, but the pass has none.")
            u = RMSNorm(name="cross_norm")(x)
            x = x + CrossAttention(self.width, self.heads, self.implementation, self.dtype,
                                   name="cross")(u, text)
        u = modulate(RMSNorm(use_scale=False)(x), shift2, scale2)
        return x + gate2[:, None] * SwiGLU(self.width, self.mlp_ratio, self.dtype, name="mlp")(u)


class _ScannedBlock(Block):
    """Block with the (carry, output) signature that nn.scan expects."""

    @nn.compact
    def __call__(self, x, c_bd, ctx, text=None):  # noqa: D102
        return super().__call__(x, c_bd, ctx, text), None


REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Stack(nn.Module):
    """`depth` identical blocks, optionally rematerialised and/or scanned (flat compile time)."""

    depth: int
    block: dict  # Keyword arguments of Block.
    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, x, c_bd, ctx: TokenContext, text=None, only: tuple[int, ...] | None = None):
        """Runs the blocks in order; `only` (block indices) runs just those (STG-style weak path)."""
        if self.depth == 0:
            return x
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r}; choose one of {tuple(REMAT_POLICIES)}.")
        if only is not None and self.scan:
            return self._scan_subset(x, c_bd, ctx, text, only)
        cls = _ScannedBlock if self.scan else Block
        if self.remat != "none":
            cls = nn.remat(cls, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan)
        if self.scan:
            scanned = nn.scan(
                cls, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = scanned(**self.block, name="blocks")(x, c_bd, ctx, text)
            return x
        for i in range(self.depth):
            if only is None or i in only:
                x = cls(**self.block, name=f"block_{i}")(x, c_bd, ctx, text)
        return x

    def _scan_subset(self, x, c_bd, ctx, text, only):
        # The scanned params are stacked [depth, ...]: scan one Block over the picked slices
        # (never called at init, so the params exist).
        picked = jax.tree.map(lambda a: a[jnp.asarray(only)], self.variables["params"]["blocks"])
        block = Block(**self.block)

        def body(h, p):
            return block.apply({"params": p}, h, c_bd, ctx, text), None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat])
        return jax.lax.scan(body, x, picked)[0]
