"""GLGA geometry: which outputs a single token can reach, and what the global branch pools.

- local_only: a token reaches exactly its own tile (one attention layer, and the whole DiT,
  since every other layer is per token or per sample), with and without token drop.
- global_only: a token reaches every query, but only through its cell's pooled key/value;
  the pooled keys/values are the mean of the cell's present post-RoPE keys/values. Checked
  against a float64 numpy re-computation of pooled attention from the layer's parameters.
These check numbers, not how the pooling is implemented (one-hot matmul or reshape-mean).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eflow_jax.flow.condition import Condition
from eflow_jax.models import dit, tokens
from eflow_jax.models.embed import apply_rope, rope_angles
from eflow_jax.models.glga import GLGA, TokenContext

WIDTH, HEADS = 32, 2
HEAD_DIM = WIDTH // HEADS
# 2 x 4 x 4 tokens; tiles (1, 4, 4) -> 2 tiles; cells (1, 2, 2) -> 8 cells; groups (1, 2, 1) keep 1.
LAYOUT = tokens.validate_layout(2, 4, 4, (1, 1, 1), (1, 4, 4), (1, 2, 2), (1, 2, 1), 1)


def _context(keep):
    """The TokenContext of the tokens kept by `keep` (None = all), as the DiT builds it."""
    coords, cells, tiles = (jnp.asarray(a)[None] for a in (LAYOUT.coords(), LAYOUT.cell_ids(),
                                                          LAYOUT.tile_ids()))
    per_tile = LAYOUT.tile_size
    if keep is not None:
        coords, cells, tiles = (jnp.take(a[0], keep, axis=0) for a in (coords, cells, tiles))
        per_tile = keep.shape[1] // LAYOUT.num_tiles
    return TokenContext(rope_angles(coords, HEAD_DIM), cells, tiles, per_tile, LAYOUT.num_cells)


def _layer(mode):
    return GLGA(WIDTH, HEADS, mode=mode, implementation="xla", dtype=jnp.float32)


def _params(seed=0):
    """Random values for every parameter (norm scales and biases included)."""
    u = jnp.zeros((1, LAYOUT.num_tokens, WIDTH))
    shapes = nn.meta.unbox(_layer("glga").init(jax.random.key(0), u, _context(None))["params"])
    leaves, tree = jax.tree.flatten(shapes)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [jnp.asarray(1.0 * rng.standard_normal(x.shape) /
                                                 np.sqrt(x.shape[0] if x.ndim > 1 else 1), jnp.float32)
                                     for x in leaves])


def _keep(seed, batch=2):
    return tokens.sample_keep(jax.random.key(seed), batch, LAYOUT)


def _inputs(n, seed=1, batch=2):
    return jax.random.normal(jax.random.key(seed), (batch, n, WIDTH))


def _bump(u, j):
    """u with token j (of every sample) changed."""
    return u.at[:, j].add(jax.random.normal(jax.random.key(99), (u.shape[0], WIDTH)))


def _setup(dropped: bool, keep_seed: int):
    """(params, keep, ctx, n, u): a layer's params and one pass's tokens, token-dropped or dense."""
    keep = _keep(keep_seed) if dropped else None
    n = LAYOUT.num_keep if dropped else LAYOUT.num_tokens
    return _params(), keep, _context(keep), n, _inputs(n)


@pytest.mark.parametrize("dropped", [False, True])
def test_local_only_token_reaches_exactly_its_tile(dropped):
    """A token changes every present query of its own tile and nothing outside it."""
    params, keep, ctx, n, u = _setup(dropped, keep_seed=3)
    f = lambda x: _layer("local_only").apply({"params": params}, x, ctx)  # noqa: E731
    tiles = np.asarray(jnp.broadcast_to(ctx.tile_ids, (2, n)))
    for j in (0, n - 1):  # a token of the first tile and one of the last
        change = np.abs(np.asarray(f(_bump(u, j)) - f(u))).max(-1)  # [B, n]
        same_tile = tiles == tiles[:, j:j + 1]
        assert np.all(change[~same_tile] == 0.0)
        assert np.all(change[same_tile] > 1e-5)


@pytest.mark.parametrize("dropped", [False, True])
def test_global_only_token_reaches_every_query(dropped):
    """A token changes every query (in other tiles and cells too): the global branch is global."""
    params, keep, ctx, n, u = _setup(dropped, keep_seed=4)
    f = lambda x: _layer("global_only").apply({"params": params}, x, ctx)  # noqa: E731
    change = np.abs(np.asarray(f(_bump(u, 5)) - f(u))).max(-1)
    assert np.all(change > 1e-6)


def _np_pooled_attention(params, u, ctx):
    """float64 pooled global attention: mean present post-RoPE K/V per cell, then softmax."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    u = np.asarray(u, np.float64)
    qkv = np.einsum("bnd,dthk->bnthk", u, p["qkv"]["kernel"]) + p["qkv"]["bias"]

    def rms(x, scale):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * scale

    angles = np.asarray(ctx.angles)
    rope = lambda x: np.asarray(apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(angles)), np.float64)  # noqa: E731
    q = rope(rms(qkv[:, :, 0], p["q_norm"]["scale"]))
    k = rope(rms(qkv[:, :, 1], p["k_norm"]["scale"]))
    v = qkv[:, :, 2]
    cells = np.broadcast_to(np.asarray(ctx.cell_ids), u.shape[:2])
    b = u.shape[0]
    k_bar = np.zeros((b, ctx.num_cells, HEADS, HEAD_DIM))
    v_bar = np.zeros_like(k_bar)
    for i in range(b):
        for c in range(ctx.num_cells):
            present = cells[i] == c
            assert present.any()  # structured drop keeps every cell populated
            k_bar[i, c], v_bar[i, c] = k[i, present].mean(0), v[i, present].mean(0)
    logits = np.einsum("bnhd,bchd->bhnc", q, k_bar) / np.sqrt(HEAD_DIM)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    o = np.einsum("bhnc,bchd->bnhd", attn, v_bar)
    return np.einsum("bnhd,hdw->bnw", o, p["out"]["kernel"]) + p["out"]["bias"], k_bar, v_bar


@pytest.mark.parametrize("dropped", [False, True])
def test_global_pooling_is_the_mean_of_present_post_rope_keys_and_values(dropped):
    """global_only = softmax(q K_bar^T / sqrt(d)) V_bar with K_bar/V_bar the present-token means."""
    params, keep, ctx, n, u = _setup(dropped, keep_seed=5)
    out = _layer("global_only").apply({"params": params}, u, ctx)
    ref, _, _ = _np_pooled_attention(params, u, ctx)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    # Pooling over all tokens of the cell (ignoring the drop) would give other numbers.
    if dropped:
        full_ref, _, _ = _np_pooled_attention(params, _inputs(LAYOUT.num_tokens), _context(None))
        assert np.abs(out - full_ref[:, np.asarray(keep[0])]).max() > 1e-3


@pytest.mark.parametrize("dropped", [False, True])
def test_global_only_token_acts_only_through_its_cell_summary(dropped):
    """After bumping token j, the other queries' outputs equal pooled attention with the old
    queries and the old summaries of every cell except j's: nothing else carries j."""
    params, keep, ctx, n, u = _setup(dropped, keep_seed=6)
    j = 3
    u2 = _bump(u, j)
    out2 = np.asarray(_layer("global_only").apply({"params": params}, u2, ctx))
    _, k_old, v_old = _np_pooled_attention(params, u, ctx)
    _, k_new, v_new = _np_pooled_attention(params, u2, ctx)
    cells = np.broadcast_to(np.asarray(ctx.cell_ids), (2, n))
    for b in range(2):
        c = cells[b, j]
        others = [i for i in range(ctx.num_cells) if i != c]
        np.testing.assert_allclose(k_new[b, others], k_old[b, others], atol=1e-12)
        assert np.abs(k_new[b, c] - k_old[b, c]).max() > 1e-4
    # Re-run the layer's pooled attention by hand with the summaries spliced: old everywhere,
    # new only in j's cell; queries i != j are unchanged by the bump, so they must agree.
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    q_old = _np_queries(p, u, ctx)
    k_mix, v_mix = k_old.copy(), v_old.copy()
    for b in range(2):
        c = cells[b, j]
        k_mix[b, c], v_mix[b, c] = k_new[b, c], v_new[b, c]
    logits = np.einsum("bnhd,bchd->bhnc", q_old, k_mix) / np.sqrt(HEAD_DIM)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    o = np.einsum("bhnc,bchd->bnhd", attn, v_mix)
    ref = np.einsum("bnhd,hdw->bnw", o, p["out"]["kernel"]) + p["out"]["bias"]
    not_j = np.arange(n) != j
    np.testing.assert_allclose(out2[:, not_j], ref[:, not_j], rtol=1e-4, atol=1e-4)


def _np_queries(p, u, ctx):
    u = np.asarray(u, np.float64)
    q = np.einsum("bnd,dhk->bnhk", u, p["qkv"]["kernel"][:, 0]) + p["qkv"]["bias"][0]
    q = q / np.sqrt(np.mean(q * q, -1, keepdims=True) + 1e-6) * p["q_norm"]["scale"]
    return np.asarray(apply_rope(jnp.asarray(q, jnp.float32), ctx.angles), np.float64)


# ---- the same locality through the whole DiT (patch embed, MLPs, fusion are per token) ----

def _dit_local(keep_per_group):
    cfg = dit.model_config("tiny", video_shape=(2, 8, 8, 3), patch=(1, 2, 2), tile=(1, 2, 2),
                           cell=(1, 2, 2), drop_group=(1, 1, 2), keep_per_group=keep_per_group,
                           dtype="float32", num_classes=3, attention_impl="xla", mode="local_only")
    model, net = dit.make_network(cfg)
    params = nn.meta.unbox(dit.init_params(model, jax.random.key(0)))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)])
    return model, net, params


@pytest.mark.parametrize("keep_per_group", [2, 1])  # 2 of 2: no drop; 1 of 2: half dropped
def test_dit_local_only_input_patch_reaches_exactly_its_tile(keep_per_group):
    """Through the whole local_only DiT (with and without token drop) a patch reaches its tile."""
    model, net, params = _dit_local(keep_per_group)
    layout = dit.layout_of(model.config)
    x = jax.random.normal(jax.random.key(2), (1, 2, 8, 8, 3))
    t, s, y = jnp.array([0.7]), jnp.array([0.2]), Condition.of_labels(jnp.array([1]))
    keep = net.sample_keep(jax.random.key(3), 1)
    assert (keep is None) == (keep_per_group == 2)
    f = jax.jit(lambda x_: net(params, x_, t, s, y, keep))
    x2 = x.at[0, 1, 2:4, 4:6, :].add(1.0)  # the patch at token (t=1, h=1, w=2)
    change = np.abs(np.asarray(tokens.patchify(f(x2) - f(x), layout))).max(-1)[0]  # [N] token order
    coords = layout.coords()
    tile = (coords[:, 0] == 1) & (coords[:, 1] // 2 == 0) & (coords[:, 2] // 2 == 1)
    assert tile.sum() == 4
    assert np.all(change[~tile] == 0.0)
    assert np.all(change[tile] > 1e-6)
