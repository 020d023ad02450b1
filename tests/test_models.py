"""Model invariants (docs/METHOD.md section 11, items 6, 7, 8, 9, 11) and shapes, FLOPs, errors."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eflow_jax.flow.condition import Condition
from eflow_jax.models import attention, dit, tokens
from eflow_jax.models.embed import rope_angles
from eflow_jax.models.glga import GLGA, TokenContext


def tiny_cfg(**overrides):
    base = dict(video_shape=(4, 16, 16, 3), patch=(1, 2, 2), tile=(2, 4, 4), cell=(1, 4, 4),
                drop_group=(1, 2, 2), dtype="float32", num_classes=5, attention_impl="xla")
    return dit.model_config("tiny", **(base | overrides))


def random_params(model, seed=0, scale=0.05):
    """Init, then overwrite every param with noise so zero-init layers cannot hide bugs."""
    params = nn.meta.unbox(dit.init_params(model, jax.random.key(seed)))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(
        treedef, [scale * jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)])


def inputs(batch=2, shape=(4, 16, 16, 3), seed=3):
    ks = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(ks[0], (batch, *shape))
    t = jax.random.uniform(ks[1], (batch,), minval=0.2, maxval=1.0)
    s = t * jax.random.uniform(ks[2], (batch,))
    y = Condition.of_labels(jax.random.randint(ks[3], (batch,), 0, 6))
    return x, t, s, y


@pytest.fixture(scope="module")
def tiny():
    model, net = dit.make_network(tiny_cfg())
    return model, net, random_params(model)


def test_drop_ratio_zero_equals_dense_bitwise(tiny):
    model, net, params = tiny
    x, t, s, y = inputs()
    n = model.config.video_shape[0] * 8 * 8
    keep_all = jnp.tile(jnp.arange(n, dtype=jnp.int32), (2, 1))
    dense = net(params, x, t, s, y, None)
    dropped = net(params, x, t, s, y, keep_all)
    np.testing.assert_array_equal(np.asarray(dense), np.asarray(dropped))
    assert float(jnp.abs(dense).max()) > 1e-3  # Not a vacuous comparison of zeros.


def test_one_tile_local_only_equals_full_attention():
    cfg_local = tiny_cfg(mode="local_only", tile=(4, 8, 8), cell=(4, 8, 8))
    cfg_full = tiny_cfg(mode="full", tile=(4, 8, 8), cell=(4, 8, 8))
    model_l, net_l = dit.make_network(cfg_local)
    _, net_f = dit.make_network(cfg_full)
    params = random_params(model_l)
    x, t, s, y = inputs()
    np.testing.assert_allclose(net_l(params, x, t, s, y), net_f(params, x, t, s, y), atol=1e-5, rtol=1e-5)


def test_zero_init_gates_average_branches():
    b, n, width, heads = 2, 32, 32, 2
    u = jax.random.normal(jax.random.key(0), (b, n, width))
    layout = tokens.validate_layout(2, 4, 4, (1, 1, 1), (1, 4, 4), (2, 2, 2), (1, 2, 2), 1)
    ctx = TokenContext(rope_angles(jnp.asarray(layout.coords())[None], width // heads),
                       jnp.asarray(layout.cell_ids())[None], jnp.asarray(layout.tile_ids())[None],
                       layout.tile_size, layout.num_cells)
    mods = {m: GLGA(width, heads, mode=m, implementation="xla", dtype=jnp.float32)
            for m in ("glga", "local_only", "global_only")}
    params = nn.meta.unbox(mods["glga"].init(jax.random.key(1), u, ctx)["params"])
    assert float(jnp.abs(params["gate"]["kernel"]).max()) == 0.0
    out = mods["glga"].apply({"params": params}, u, ctx)
    # W_o is linear with a bias, so 0.5*(O_loc + O_glb) through it = mean of the two outputs.
    loc = mods["local_only"].apply({"params": params}, u, ctx)
    glb = mods["global_only"].apply({"params": params}, u, ctx)
    np.testing.assert_allclose(out, 0.5 * (loc + glb), atol=1e-5)


@pytest.mark.parametrize("group,k", [((1, 2, 2), 1), ((2, 2, 2), 2), ((1, 2, 2), 3)])
def test_structured_mask_keeps_k_per_group(group, k):
    layout = tokens.validate_layout(4, 8, 8, (1, 1, 1), (2, 4, 4), (2, 4, 4), group, k)
    ids = tokens.sample_keep(jax.random.key(0), 3, layout)
    assert ids.shape == (3, layout.num_keep) == (3, int(layout.num_tokens * (1 - layout.drop_ratio)))
    group_of = np.asarray(ids) // layout.group_size
    for row in group_of:
        np.testing.assert_array_equal(np.bincount(row, minlength=layout.num_groups), k)
    # Sorted ids stay tile-contiguous with equal counts per tile: local attention is a reshape.
    tiles = layout.tile_ids()[np.asarray(ids)]
    per_tile = layout.num_keep // layout.num_tiles
    np.testing.assert_array_equal(tiles, np.repeat(np.arange(layout.num_tiles), per_tile)[None].repeat(3, 0))


def test_restore_inverts_and_coords_match_grid():
    layout = tokens.validate_layout(4, 8, 8, (1, 1, 1), (2, 4, 4), (1, 4, 4), (1, 2, 2), 1)
    keep = tokens.sample_keep(jax.random.key(1), 2, layout)
    remove = tokens.removed_ids(keep, layout.num_tokens)
    restore = tokens.restore_ids(keep, layout.num_tokens)
    shuffled = jnp.concatenate([keep, remove], axis=1)
    np.testing.assert_array_equal(jnp.take_along_axis(shuffled, restore, axis=1),
                                  jnp.tile(jnp.arange(layout.num_tokens), (2, 1)))
    # Coordinates gathered with the tokens are the tokens' original grid positions: write each
    # pixel's own (t, h, w) into the video, patchify, gather the kept tokens, and compare.
    grid = np.stack(np.meshgrid(*(np.arange(g) for g in (4, 8, 8)), indexing="ij"), -1)
    x = jnp.asarray(grid[None], jnp.float32)  # [1, 4, 8, 8, 3]: channels = (t, h, w)
    for ids in (keep, jnp.tile(jnp.arange(layout.num_tokens, dtype=jnp.int32), (2, 1))):
        carried = tokens.gather_tokens(jnp.tile(tokens.patchify(x, layout), (2, 1, 1)), ids)
        np.testing.assert_array_equal(carried, layout.coords()[np.asarray(ids)])
    # The order is tile-major: each tile's tokens are one contiguous run inside that tile's box.
    coords = layout.coords()
    for tile in range(layout.num_tiles):
        box = coords[tile * layout.tile_size:(tile + 1) * layout.tile_size] // np.array(layout.tile)
        assert len(np.unique(box, axis=0)) == 1


def test_unstructured_drop_runs_and_differs():
    """The ragged (masked) path computes the same numbers as the reshape path on the same kept
    tokens, and an unstructured mask really changes the output versus dense and other masks."""
    model, net_u = dit.make_network(tiny_cfg(structured_drop=False))
    _, net_s = dit.make_network(tiny_cfg())
    params = random_params(model)
    x, t, s, y = inputs()
    structured_keep = net_s.sample_keep(jax.random.key(5), 2)
    np.testing.assert_allclose(net_u(params, x, t, s, y, structured_keep),
                               net_s(params, x, t, s, y, structured_keep), atol=1e-5, rtol=1e-5)
    keep = net_u.sample_keep(jax.random.key(5), 2)
    per_tile = np.stack([np.bincount(r, minlength=8) for r in model_tile_ids(keep)])
    assert per_tile.min() != per_tile.max()  # really ragged: the masked path is exercised
    out = net_u(params, x, t, s, y, keep)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    dense = net_u(params, x, t, s, y, None)
    other = net_u(params, x, t, s, y, net_u.sample_keep(jax.random.key(6), 2))
    for ref in (dense, other):  # every sample differs
        assert float(jnp.abs(out - ref).max(axis=(1, 2, 3, 4)).min()) > 1e-4


def model_tile_ids(keep):
    layout = dit.layout_of(tiny_cfg())
    return layout.tile_ids()[np.asarray(keep)]


def test_same_mask_is_bitwise_deterministic(tiny):
    model, net, params = tiny
    x, t, s, y = inputs()
    keep_a = net.sample_keep(jax.random.key(7), 2)
    keep_b = net.sample_keep(jax.random.key(7), 2)
    np.testing.assert_array_equal(keep_a, keep_b)
    f = jax.jit(net.__call__)
    np.testing.assert_array_equal(f(params, x, t, s, y, keep_a), f(params, x, t, s, y, keep_b))
    other = net(params, x, t, s, y, net.sample_keep(jax.random.key(8), 2))
    assert float(jnp.abs(other - f(params, x, t, s, y, keep_a)).max()) > 1e-6


def test_weak_path_is_middle_replaced_by_mask_token(tiny):
    model, net, params = tiny
    x, t, _, y = inputs()
    weak = net.weak(params, x, t, y)
    drop_all = model.apply({"params": params}, model.apply(
        {"params": params}, x, t, y, path_drop=jnp.ones((2,), bool), method=dit.EFlowDiT.encode),
        t, t, method=dit.EFlowDiT.decode)
    # net.weak is one jitted program, the reference runs op by op: equal up to float rounding.
    np.testing.assert_allclose(weak, drop_all, rtol=1e-5, atol=1e-6)
    full = net(params, x, t, t, y)
    assert float(jnp.abs(full - weak).max()) > 1e-4  # The middle does contribute.
    # And the weak pass never runs the middle blocks: changing them does not change it.
    bumped = dict(params, middle=jax.tree.map(lambda p: p + 1.0, params["middle"]))
    np.testing.assert_array_equal(weak, net.weak(bumped, x, t, y))


def test_decoupled_trunk_ignores_s_joint_does_not(tiny):
    model, _, params = tiny
    x, t, s, y = inputs()
    trunk = lambda m, p, s_: jnp.sum(m.apply({"params": p}, x, t, s_, y, method=dit.EFlowDiT.trunk_tokens))  # noqa: E731
    grad_s = jax.grad(lambda s_: trunk(model, params, s_))(s)
    np.testing.assert_array_equal(grad_s, 0.0)
    joint = dit.EFlowDiT(tiny_cfg(decoupled=False))
    grad_joint = jax.grad(lambda s_: trunk(joint, params, s_))(s)
    assert float(jnp.abs(grad_joint).max()) > 0


@pytest.mark.parametrize("shape,patch,tile,cell,group", [
    ((4, 16, 16, 3), (1, 2, 2), (2, 4, 4), (1, 4, 4), (1, 2, 2)),
    ((5, 16, 8, 4), (1, 2, 2), (5, 4, 4), (1, 4, 2), (1, 2, 2)),   # Odd T (17-frame latents).
    ((8, 16, 16, 3), (2, 4, 4), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
    ((2, 12, 20, 1), (1, 2, 2), (2, 2, 2), (1, 6, 10), (1, 2, 2)),
])
def test_output_shape_matches_input(shape, patch, tile, cell, group):
    k = 2 if math.prod(group) == 8 else 1
    model, net = dit.make_network(tiny_cfg(video_shape=shape, patch=patch, tile=tile, cell=cell,
                                           drop_group=group, keep_per_group=k))
    params = jax.eval_shape(lambda: nn.meta.unbox(dit.init_params(model, jax.random.key(0))))
    x, t, s, y = inputs(shape=shape)
    for keep in (None, net.sample_keep(jax.random.key(0), 2)):  # Shapes only: no compile needed.
        assert jax.eval_shape(net.__call__, params, x, t, s, y, keep).shape == x.shape


# Param counts, pinned (video_shape (16, 64, 64, 3), patch (2, 4, 4), 10 classes).
PINNED_PARAMS = {"tiny": 387_888, "S": 33_145_200, "B": 131_869_824, "L": 462_782_304, "XL": 679_220_000}


@pytest.mark.parametrize("variant", sorted(PINNED_PARAMS))
def test_param_counts_pinned(variant):
    model = dit.EFlowDiT(dit.model_config(variant, attention_impl="xla"))
    shapes = jax.eval_shape(lambda: nn.meta.unbox(dit.init_params(model, jax.random.key(0))))
    count = sum(math.prod(a.shape) for a in jax.tree.leaves(shapes))
    print(f"{variant}: {count:,} params")
    assert count == PINNED_PARAMS[variant]


def test_flop_savings_eflow_b():
    flops = dit.count_flops(dit.model_config("B", attention_impl="xla"))  # 16x64x64, patch (2,4,4): 2048 tokens
    assert flops.middle_dense / flops.middle_dropped >= 2.5
    assert flops.weak / flops.full <= 0.35
    _, _, (e, m, d) = dit.VARIANTS["B"]
    assert flops.weak / flops.full < (e + d + 1) / (e + m + d)


@pytest.mark.parametrize("mode,keep", [("glga", False), ("glga", True), ("full", False)])
def test_flop_counter_matches_xla(mode, keep):
    cfg = dit.model_config("S", video_shape=(4, 32, 32, 3), patch=(1, 2, 2), tile=(2, 4, 4),
                           cell=(1, 4, 4), dtype="float32", attention_impl="xla", mode=mode)
    model, net = dit.make_network(cfg)
    params = jax.eval_shape(lambda: nn.meta.unbox(dit.init_params(model, jax.random.key(0))))
    x, t, s, y = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), inputs(1, (4, 32, 32, 3)))
    k = jax.ShapeDtypeStruct((1, 4 * 16 * 16 // 4), jnp.int32) if keep else None
    compiled = jax.jit(net.__call__).lower(params, x, t, s, y, k).compile()
    xla = compiled.cost_analysis()
    xla = xla[0] if isinstance(xla, list) else xla
    ours = dit.count_flops(cfg)
    expected = ours.dropped if keep else ours.full
    assert abs(xla["flops"] / expected - 1) < 0.10, (xla["flops"], expected)


@pytest.mark.parametrize("mode", ["glga", "local_only", "global_only"])
def test_tiny_dit_dropped_weak_decoder_flops_match_xla(mode):
    """count_flops' dropped / weak / decoder passes vs XLA's compiled count on the tiny DiT (10%).

    The cost model of docs/METHOD.md section 8 is built from these three numbers; the dropped pass
    must also really be cheaper than the dense one (so a keep mask that is ignored shows).
    """
    cfg = tiny_cfg(mode=mode)
    model, net = dit.make_network(cfg)
    params = jax.eval_shape(lambda: nn.meta.unbox(dit.init_params(model, jax.random.key(0))))
    x, t, s, y = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), inputs(1))
    layout = dit.layout_of(cfg)
    keep = jax.ShapeDtypeStruct((1, layout.num_keep), jnp.int32)
    width = dit.VARIANTS["tiny"][0]
    trunk = {"h": jax.ShapeDtypeStruct((1, layout.num_tokens, width), jnp.float32),
             "cond": jax.ShapeDtypeStruct((1, width), jnp.float32), "text": None}

    def counted(fn, *args):
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost)["flops"])

    ours = dit.count_flops(cfg)
    xla = dict(full=counted(net.__call__, params, x, t, s, y, None),
               dropped=counted(net.__call__, params, x, t, s, y, keep),
               weak=counted(net.weak, params, x, t, y),
               decoder=counted(net.decode, params, trunk, t, s))
    for kind, flops in xla.items():
        assert abs(flops / getattr(ours, kind) - 1) < 0.10, (kind, flops, getattr(ours, kind))
    assert xla["decoder"] < xla["weak"] < xla["dropped"] < 0.8 * xla["full"]


def test_scan_and_remat_match_unrolled(tiny):
    model, net, params = tiny
    x, t, s, y = inputs()
    ref = net(params, x, t, s, y)
    _, net_remat = dit.make_network(tiny_cfg(remat="dots"))
    np.testing.assert_allclose(net_remat(params, x, t, s, y), ref, atol=1e-6)
    _, net_scan = dit.make_network(tiny_cfg(scan_layers=True))

    def stack(tree):  # {'block_0': p0, 'block_1': p1} -> {'blocks': stacked}
        blocks = [tree[f"block_{i}"] for i in range(len(tree))]
        return {"blocks": jax.tree.map(lambda *a: jnp.stack(a), *blocks)}

    scanned = {k: stack(v) if k in ("encoder", "middle", "decoder") else v for k, v in params.items()}
    np.testing.assert_allclose(net_scan(scanned, x, t, s, y), ref, atol=1e-5)


def test_splash_attention_interpret_matches_xla():
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 128, 2, 32)) for i in range(3))
    out = attention.attend(q, k, v, implementation="splash")
    ref = attention.attend(q, k, v, implementation="xla")
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_default_implementation_per_backend():
    assert attention.default_implementation("gpu") == "cudnn"
    assert attention.default_implementation("tpu") == "splash"
    assert attention.default_implementation("cpu") == "xla"


@pytest.mark.parametrize("overrides,message", [
    (dict(tile=(3, 4, 4)), "model.tile"),
    (dict(drop_group=(1, 3, 3)), "model.drop_group"),
    (dict(cell=(1, 3, 3)), "model.cell"),
    (dict(video_shape=(5, 16, 16, 3), patch=(2, 2, 2)), "model.patch"),
    (dict(tile=(2, 2, 2), drop_group=(2, 4, 4)), "model.tile"),
    (dict(keep_per_group=9), "model.keep_per_group"),
    (dict(mode="sparse"), "model.mode"),
    (dict(attention_impl="cudnn"), "bf16"),  # tiny_cfg computes in float32.
])
def test_bad_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        dit.make_network(tiny_cfg(**overrides))


def test_cudnn_head_dim_error():
    with pytest.raises(ValueError, match="head_dim"):
        attention.check_supported("cudnn", 160, jnp.bfloat16)


def test_each_distinct_network_call_is_traced_once(tiny, monkeypatch):
    """make_network jits encode/decode, so the eflow loss's repeated network calls (the decoder queries) are
    traced once per distinct signature: tracing each call was most of the step's compile start."""
    from eflow_jax.flow import objectives

    model, net, params = tiny
    traced = {"encode": 0, "decode": 0}
    for fn, kind in ((tokens.patchify, "encode"), (tokens.unpatchify, "decode")):
        def counting(*a, _fn=fn, _kind=kind, **k):  # Runs once per trace of encode / decode.
            traced[_kind] += 1
            return _fn(*a, **k)
        monkeypatch.setattr(dit.tokens, fn.__name__, counting)
    calls = {"encode": [], "decode": []}

    def signature(args):
        return tuple((a.shape, a.dtype, jax.typeof(a).weak_type) for a in jax.tree.leaves(args))

    def encode(p, x, t, cond, keep, weak):
        calls["encode"].append((signature((x, t, cond, keep)), weak))
        return net.encode(p, x, t, cond, keep, weak)

    def decode(p, trunk, t, s):
        calls["decode"].append(signature((trunk, t, s)))
        return net.decode(p, trunk, t, s)

    counted = dataclasses.replace(net, encode=encode, decode=decode)
    loss_fn = objectives.make_loss(objectives.default_objective_config("eflow"), counted, 100)
    x, _, _, y = inputs(batch=16)
    jax.jit(jax.value_and_grad(loss_fn, has_aux=True)).trace(params, x, y, jax.random.key(0), 3)
    assert len(calls["decode"]) > len(set(calls["decode"]))  # Repeats to deduplicate.
    for kind in ("encode", "decode"):
        assert traced[kind] == len(set(calls[kind])), (kind, traced, len(calls[kind]))
