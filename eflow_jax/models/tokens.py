"""Token geometry: patchify, the tile-major token order, and structured random token drop.

Tokens live in one fixed order chosen so that every attention pattern is a reshape
(docs/METHOD.md section 4.4): tiles in raster order; inside a tile, drop groups in raster order;
inside a group, tokens in raster order. With the structured drop (keep exactly k tokens of
every group) the kept tokens, sorted, stay tile-contiguous with the same count in every
tile, so local attention is `reshape -> SDPA` with no mask and no padding, whatever the mask.

Every array here is computed with numpy at trace time from static shapes; nothing in this
file depends on data except `sample_keep`, which draws per-sample index arrays.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

Box = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Static description of the token grid of one input shape.

    Attributes:
      grid: token grid (gT, gH, gW) after patchify.
      patch: patch size (pt, ph, pw) in input pixels/latents.
      tile: local-attention tile (wt, wh, ww) in tokens.
      cell: global pooling cell (pt, ph, pw) in tokens.
      group: drop group (gt, gh, gw) in tokens; `keep_per_group` of each are kept.
      keep_per_group: k, tokens kept per group when dropping.
    """

    grid: Box
    patch: Box
    tile: Box
    cell: Box
    group: Box
    keep_per_group: int

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def group_size(self) -> int:
        return math.prod(self.group)

    @property
    def tile_size(self) -> int:
        return math.prod(self.tile)

    @property
    def num_tiles(self) -> int:
        return self.num_tokens // self.tile_size

    @property
    def num_cells(self) -> int:
        return self.num_tokens // math.prod(self.cell)

    @property
    def num_groups(self) -> int:
        return self.num_tokens // self.group_size

    @property
    def num_keep(self) -> int:
        """Kept tokens per sample under the structured drop."""
        return self.num_groups * self.keep_per_group

    @property
    def drop_ratio(self) -> float:
        return 1.0 - self.keep_per_group / self.group_size

    # ---- static index tables (numpy, computed once per trace) ----

    def order(self) -> np.ndarray:
        """Raster token index of each position in tile-major/group-major order, shape [N]."""
        return _nested_order(self.grid, [self.tile, self.group])

    def coords(self) -> np.ndarray:
        """Original (t, h, w) integer coordinates of each ordered token, int32 [N, 3]."""
        t, h, w = np.unravel_index(self.order(), self.grid)
        return np.stack([t, h, w], axis=-1).astype(np.int32)

    def tile_ids(self) -> np.ndarray:
        """Tile index of each ordered token, int32 [N] (contiguous runs by construction)."""
        return _box_ids(self.coords(), self.grid, self.tile)

    def cell_ids(self) -> np.ndarray:
        """Pooling-cell index of each ordered token, int32 [N]."""
        return _box_ids(self.coords(), self.grid, self.cell)

    def cells_contiguous(self) -> bool:
        """Whether every pooling cell is one contiguous run of the token order (then pooling is a
        reshape-mean). True when the cell lies inside a tile and spans whole rows of the tile's
        raster of drop groups, e.g. cell (1,4,4) or (2,4,4) in tile (2,4,4) or (4,4,4); not when a
        cell is larger than a tile. A structured drop keeps this: sorted kept ids of a run stay a run.
        """
        ids = self.cell_ids()
        size = math.prod(self.cell)
        runs = ids.reshape(-1, size)
        return bool(np.all(runs == runs[:, :1]) and len(np.unique(runs[:, 0])) == len(runs))


def _box_ids(coords: np.ndarray, grid: Box, box: Box) -> np.ndarray:
    n_boxes = [g // b for g, b in zip(grid, box, strict=True)]
    idx = [coords[:, a] // box[a] for a in range(3)]
    return np.ravel_multi_index(idx, n_boxes).astype(np.int32)


def _nested_order(grid: Box, boxes: list[Box]) -> np.ndarray:
    """Raster indices ordered by nested boxes: outer boxes raster, then inner boxes, then tokens.

    `boxes` goes from outermost to innermost; each must divide the previous one.
    """
    coords = np.stack(np.unravel_index(np.arange(math.prod(grid)), grid), axis=-1)
    keys = []  # np.lexsort sorts by the last key first.
    outer = grid
    for box in boxes:
        keys.append(_box_ids(coords % np.array(outer), outer, box))
        outer = box
    keys.append(np.ravel_multi_index(tuple((coords % np.array(outer)).T), outer))
    return np.lexsort(keys[::-1]).astype(np.int32)


def validate_layout(
    frames: int, height: int, width: int, patch: Box, tile: Box, cell: Box, group: Box, keep: int
) -> TokenLayout:
    """Checks that every box divides what it must; returns the layout or raises ValueError."""
    size = (frames, height, width)
    for name, s, p in zip("THW", size, patch, strict=True):
        if s % p:
            raise ValueError(
                f"input {name}={s} is not divisible by model.patch {patch}; change model.patch or the "
                f"clip shape (data.num_frames / data.resolution)."
            )
    grid = tuple(s // p for s, p in zip(size, patch, strict=True))
    for field, box in (("model.tile", tile), ("model.cell", cell), ("model.drop_group", group)):
        if any(g % b for g, b in zip(grid, box, strict=True)):
            raise ValueError(
                f"{field}={box} does not divide the token grid {grid} (input {size} / patch {patch}); "
                f"pick a {field} whose sides divide the grid."
            )
    for field, box in (("model.tile", tile), ("model.cell", cell)):
        if any(b % g for b, g in zip(box, group, strict=True)):
            raise ValueError(
                f"{field}={box} is not a multiple of model.drop_group={group}: every tile and cell must "
                f"hold whole drop groups so each keeps the same number of tokens (docs/METHOD.md 4.3)."
            )
    if not 1 <= keep <= math.prod(group):
        raise ValueError(
            f"model.keep_per_group={keep} must be in [1, {math.prod(group)}] for drop_group={group}."
        )
    return TokenLayout(grid, patch, tile, cell, group, keep)


# ---- patchify in token order ----


def patchify(x_bthwc: jax.Array, layout: TokenLayout) -> jax.Array:
    """[B, T, H, W, C] -> [B, N, pt*ph*pw*C] in the layout's token order."""
    b, _, _, _, c = x_bthwc.shape
    (gt, gh, gw), (pt, ph, pw) = layout.grid, layout.patch
    x = x_bthwc.reshape(b, gt, pt, gh, ph, gw, pw, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, gt * gh * gw, pt * ph * pw * c)
    return jnp.take(x, layout.order(), axis=1)


def unpatchify(tokens: jax.Array, layout: TokenLayout, channels: int) -> jax.Array:
    """Inverse of `patchify`: [B, N, pt*ph*pw*C] -> [B, T, H, W, C]."""
    b = tokens.shape[0]
    (gt, gh, gw), (pt, ph, pw) = layout.grid, layout.patch
    x = jnp.take(tokens, np.argsort(layout.order()), axis=1)
    x = x.reshape(b, gt, gh, gw, pt, ph, pw, channels).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, gt * pt, gh * ph, gw * pw, channels)


# ---- token drop masks ----


def sample_keep(rng: jax.Array, batch: int, layout: TokenLayout, structured: bool = True):
    """Draws kept-token ids per sample, int32 [B, n_keep], sorted in token order.

    Structured (SPRINT): every drop group keeps exactly `keep_per_group` random tokens, so
    every tile and cell keeps the same count. Unstructured: n_keep uniform over all tokens.
    """
    if structured:
        g, k = layout.group_size, layout.keep_per_group
        scores = jax.random.uniform(rng, (batch, layout.num_groups, g))
        within = jnp.sort(jnp.argsort(scores, axis=-1)[..., :k], axis=-1)
        ids = within + (jnp.arange(layout.num_groups) * g)[None, :, None]
        return ids.reshape(batch, -1).astype(jnp.int32)
    scores = jax.random.uniform(rng, (batch, layout.num_tokens))
    return jnp.sort(jnp.argsort(scores, axis=-1)[:, : layout.num_keep], axis=-1).astype(jnp.int32)


def removed_ids(ids_keep: jax.Array, num_tokens: int) -> jax.Array:
    """The complement of `ids_keep` per sample, sorted, int32 [B, N - n_keep]."""
    kept = jnp.zeros((ids_keep.shape[0], num_tokens), bool)
    kept = kept.at[jnp.arange(ids_keep.shape[0])[:, None], ids_keep].set(True)
    order = jnp.argsort(kept, axis=-1, stable=True)  # False (removed) first, in token order.
    return order[:, : num_tokens - ids_keep.shape[1]].astype(jnp.int32)


def restore_ids(ids_keep: jax.Array, num_tokens: int) -> jax.Array:
    """ids_restore: the inverse permutation of concat([ids_keep, ids_remove]), int32 [B, N]."""
    shuffle = jnp.concatenate([ids_keep, removed_ids(ids_keep, num_tokens)], axis=1)
    return jnp.argsort(shuffle, axis=1).astype(jnp.int32)


def gather_tokens(x_bnd: jax.Array, ids: jax.Array) -> jax.Array:
    """x[b, ids[b]] for every sample."""
    return jnp.take_along_axis(x_bnd, ids[..., None], axis=1)


def scatter_tokens(fill_bnd: jax.Array, x_bkd: jax.Array, ids: jax.Array) -> jax.Array:
    """Writes x into the slots `ids` of `fill` (the restore step), per sample."""
    batch = jnp.arange(fill_bnd.shape[0])[:, None]
    return fill_bnd.at[batch, ids].set(x_bkd.astype(fill_bnd.dtype))
