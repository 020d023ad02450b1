"""Issue 12, model and objective options: the STG-style weak path, the weak sub-batch's label,
label drop only with guidance, reshape pooling and honest FLOP counts (docs/METHOD.md 4-5, 8)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_networks import make_linear_network

from eflow_jax.flow import cost, objectives
from eflow_jax.flow.condition import Condition
from eflow_jax.flow.draw import Draw, VelocityBatch
from eflow_jax.flow.objectives import default_objective_config, make_loss, validate_config
from eflow_jax.models import dit, tokens
from eflow_jax.models.embed import rope_angles
from eflow_jax.models.glga import GLGA, TokenContext, pool_cells, pool_cells_onehot


def cfg(variant="tiny", **overrides):
    base = dict(video_shape=(4, 16, 16, 3), patch=(1, 2, 2), tile=(2, 4, 4), cell=(1, 4, 4),
                drop_group=(1, 2, 2), dtype="float32", num_classes=5, attention_impl="xla")
    return dit.model_config(variant, **(base | overrides))


def random_params(model, seed=0, scale=0.05):
    params = nn.meta.unbox(dit.init_params(model, jax.random.key(seed)))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, p.shape, p.dtype)
                                        for k, p in zip(keys, leaves)])


def inputs(batch=2, shape=(4, 16, 16, 3)):
    ks = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(ks[0], (batch, *shape))
    t = jax.random.uniform(ks[1], (batch,), minval=0.2, maxval=1.0)
    return x, t, Condition.of_labels(jax.random.randint(ks[2], (batch,), 0, 5))


def lowered_flops(fn, *args) -> float:
    """XLA's count of the lowered program (no compile): what the code asks for."""
    return float(jax.jit(fn).lower(*args).cost_analysis()["flops"])


# ---- STG-style weak path (docs/METHOD.md 5, ablation d) ----

@pytest.fixture()
def four_middle(monkeypatch):
    """A 1/4/1 model and the 1/2/1 model holding its middle blocks 0 and 2 (the hand-built reference)."""
    monkeypatch.setitem(dit.VARIANTS, "mid4", (32, 2, (1, 4, 1)))
    monkeypatch.setitem(dit.VARIANTS, "mid2", (32, 2, (1, 2, 1)))
    model, net = dit.make_network(cfg("mid4"))
    params = random_params(model)
    _, ref_net = dit.make_network(cfg("mid2"))
    ref_params = dict(params, middle={"block_0": params["middle"]["block_0"],
                                      "block_1": params["middle"]["block_2"]})
    return net, params, ref_net, ref_params


def test_skip_half_weak_path_runs_every_other_middle_block(four_middle):
    net, params, ref_net, ref_params = four_middle
    x, t, y = inputs()
    half = net.weak(params, x, t, y, path="skip_half")
    np.testing.assert_allclose(half, ref_net(ref_params, x, t, t, y), atol=1e-6)
    # It is neither the full path nor the mu weak path, and blocks 1 and 3 never run.
    assert float(jnp.abs(half - net(params, x, t, t, y)).max()) > 1e-4
    assert float(jnp.abs(half - net.weak(params, x, t, y)).max()) > 1e-4
    bumped = dict(params, middle=dict(params["middle"], block_1=jax.tree.map(
        lambda p: p + 1.0, params["middle"]["block_1"])))
    np.testing.assert_array_equal(half, net.weak(bumped, x, t, y, path="skip_half"))
    with pytest.raises(ValueError, match="objective.weak_path"):
        net.weak(params, x, t, y, path="skip_all")


def test_skip_half_scanned_and_joint_match(four_middle):
    net, params, _, _ = four_middle
    x, t, y = inputs()
    ref = net.weak(params, x, t, y, path="skip_half")
    _, scanned = dit.make_network(cfg("mid4", scan_layers=True, remat="dots"))

    def stack(tree):  # {'block_0': p0, ...} -> {'blocks': stacked}
        return {"blocks": jax.tree.map(lambda *a: jnp.stack(a), *[tree[f"block_{i}"] for i in range(len(tree))])}

    stacked = {k: stack(v) if k in ("encoder", "middle", "decoder") else v for k, v in params.items()}
    np.testing.assert_allclose(scanned.weak(stacked, x, t, y, path="skip_half"), ref, atol=1e-5)
    _, joint = dit.make_network(cfg("mid4", decoupled=False))  # The kind travels through the packed trunk.
    joint_half, joint_mu = (joint.weak(params, x, t, y, path=p) for p in ("skip_half", "drop_middle"))
    assert float(jnp.abs(joint_half - joint_mu).max()) > 1e-4


def test_skip_half_flops_between_weak_and_full(four_middle):
    net, params, _, _ = four_middle
    flops = dit.count_flops(cfg("mid4"))
    assert flops.weak < flops.weak_half < flops.full
    x, t, y = inputs(1)
    counted = lowered_flops(lambda p: net.weak(p, x, t, y, path="skip_half"), params)
    assert counted == pytest.approx(flops.weak_half, rel=0.1)
    # The cost model charges the skip-half pass where the weak pass is used.
    c = default_objective_config("eflow")
    d = flops.as_dict()
    base = cost.branch_costs(c, d)
    c.weak_path = "skip_half"
    half = cost.branch_costs(c, d)
    assert half["weak"] == pytest.approx(3 * flops.weak_half / flops.full)
    assert half["weak"] > base["weak"]
    assert half["velocity"] > base["velocity"] and half["consistency"] > base["consistency"]


def test_objective_routes_weak_path_to_every_weak_pass():
    net, params = make_linear_network(2, 3)
    seen = []

    def encode(p, x, t, cond, keep, weak):
        seen.append(weak)
        return net.encode(p, x, t, cond, keep, weak)

    spy = type(net)(encode, net.decode, net.sample_keep, net.decoupled)
    c = default_objective_config("eflow")
    c.weak_path = "skip_half"
    x0, y = jnp.ones((16, 2)), Condition.of_labels(jnp.zeros((16,), jnp.int32))
    jax.make_jaxpr(make_loss(c, spy, 10))(params, x0, y, jax.random.key(0), 1)
    weak_calls = [w for w in seen if w]
    # Weak sub-batch + the reference of the velocity and consistency targets.
    assert weak_calls == ["skip_half"] * 3


# ---- weak sub-batch label independent of the path drop (SPRINT) ----

def test_weak_label_independent_uses_the_samples_own_label_drop():
    net, params = make_linear_network(2, 3)
    n = 8
    k = jax.random.split(jax.random.key(0), 3)
    mask = jnp.arange(n) % 2 == 0
    b = VelocityBatch(jax.random.normal(k[0], (n, 2)), jax.random.normal(k[1], (n, 2)),
                      jax.random.uniform(k[2], (n,), minval=0.1, maxval=0.9), Condition.of_labels(jnp.arange(n) % 3),
                      mask)
    all_null = b._replace(uncond=jnp.ones((n,), bool))  # What drawing gives the weak samples for 'null'.

    def per_sample(weak_label, batch):  # The weak sub-batch's loss, the core run on one sample at a time.
        c = default_objective_config("eflow")
        c.weak_label = weak_label
        st = objectives.Settings.of(c)
        one = lambda i: jax.tree.map(lambda a: a[i:i + 1], batch)  # noqa: E731
        return jnp.stack([objectives.eflow_core(params, net, Draw(None, one(i), None), st)[0] for i in range(n)])

    loss = {w: per_sample(w, all_null if w == "null" else b) for w in ("null", "cond", "independent")}
    np.testing.assert_array_equal(loss["independent"][mask], loss["null"][mask])
    np.testing.assert_array_equal(loss["independent"][~mask], loss["cond"][~mask])
    assert float(jnp.abs(loss["null"] - loss["cond"]).max()) > 1e-4


def test_weak_label_independent_draws_label_drop_in_make_loss():
    net, params = make_linear_network(2, 3)
    x0 = jax.random.normal(jax.random.key(1), (64, 2))
    y = Condition.of_labels(jnp.arange(64) % 3)

    def weak_loss(weak_label, label_drop):
        c = default_objective_config("eflow")
        c.update(weak_label=weak_label, label_drop=label_drop, weak_ratio=0.5)
        return float(make_loss(c, net, 10)(params, x0, y, jax.random.key(2), 1)[1]["weak_loss"])

    assert weak_loss("independent", 0.0) == weak_loss("cond", 0.0)  # No drop: all labels kept.
    assert weak_loss("independent", 1.0) == weak_loss("null", 1.0)  # All dropped: all null.
    mixed = weak_loss("independent", 0.5)
    assert mixed not in (weak_loss("cond", 0.5), weak_loss("null", 0.5))
    bad = default_objective_config("eflow")
    bad.weak_label = "sometimes"
    with pytest.raises(ValueError, match="objective.weak_label"):
        validate_config(bad)


# ---- label drop only where guidance uses it (SoFlow) ----

@pytest.mark.parametrize("name,update", [
    ("eflow", dict(guidance="none")),
    ("solution_flow", dict(guidance="none")),
    ("solution_flow", dict(guidance_scale=1.0)),
    ("eflow", dict(guidance_scale=1.0)),
])
def test_label_drop_without_guidance_is_rejected_with_the_fix(name, update):
    c = default_objective_config(name)
    c.update(update)
    with pytest.raises(ValueError, match="objective.label_drop=0"):
        validate_config(c)
    c.label_drop = 0.0
    validate_config(c)


def test_flow_matching_keeps_its_label_drop():
    c = default_objective_config("flow_matching")
    assert c.label_drop == 0.1 and c.guidance == "none"
    validate_config(c)  # CFG happens in its sampler, so it trains the null label.
    net, params = make_linear_network(2, 3)
    x0, y = jnp.ones((32, 2)), Condition.of_labels(jnp.zeros((32,), jnp.int32))
    loss = lambda c: float(make_loss(c, net, 10)(params, x0, y, jax.random.key(0), 1)[0])  # noqa: E731
    no_drop = default_objective_config("flow_matching")
    no_drop.label_drop = 0.0
    assert loss(c) != loss(no_drop)


# ---- pooling: reshape-mean where cells are contiguous, honest FLOP counts ----

def _context(layout, keep=None, per_cell=0, width=32, heads=2):
    coords, cells, tiles = (jnp.asarray(a)[None] for a in (layout.coords(), layout.cell_ids(), layout.tile_ids()))
    per_tile = layout.tile_size
    if keep is not None:
        coords, cells, tiles = (jnp.take(a[0], keep, axis=0) for a in (coords, cells, tiles))
        per_tile = keep.shape[1] // layout.num_tiles
    return TokenContext(rope_angles(coords, width // heads), cells, tiles, per_tile, layout.num_cells, per_cell)


@pytest.mark.parametrize("tile,cell", [((2, 4, 4), (1, 4, 4)), ((4, 4, 4), (2, 4, 4)), ((2, 4, 4), (2, 4, 4))])
def test_reshape_pooling_equals_one_hot_pooling(tile, cell):
    layout = tokens.validate_layout(4, 8, 8, (1, 1, 1), tile, cell, (1, 2, 2), 1)
    assert layout.cells_contiguous()
    k = jax.random.normal(jax.random.key(0), (2, layout.num_tokens, 2, 8))
    k_bar, v_bar, _ = pool_cells_onehot(k, 2 * k, jnp.asarray(layout.cell_ids())[None], layout.num_cells)
    order = np.unique(layout.cell_ids(), return_index=True)[1].argsort()  # Cells in token order.
    np.testing.assert_allclose(pool_cells(k, layout.num_tokens // layout.num_cells), k_bar[:, order], atol=1e-6)
    # Through GLGA's global branch, dense and under a structured drop.
    u = jax.random.normal(jax.random.key(1), (2, layout.num_tokens, 32))
    glga = GLGA(32, 2, mode="global_only", implementation="xla", dtype=jnp.float32)
    params = glga.init(jax.random.key(2), u, _context(layout))["params"]
    for keep in (None, tokens.sample_keep(jax.random.key(3), 2, layout)):
        uk = u if keep is None else tokens.gather_tokens(u, keep)
        per_cell = uk.shape[1] // layout.num_cells
        new = glga.apply({"params": params}, uk, _context(layout, keep, per_cell))
        old = glga.apply({"params": params}, uk, _context(layout, keep, 0))
        np.testing.assert_allclose(new, old, atol=1e-5)


def test_cells_larger_than_tiles_are_not_contiguous_and_keep_one_hot():
    layout = tokens.validate_layout(2, 6, 10, (1, 1, 1), (2, 2, 2), (1, 6, 10), (1, 2, 2), 1)
    assert not layout.cells_contiguous()
    model, net = dit.make_network(cfg(video_shape=(2, 12, 20, 1), tile=(2, 2, 2), cell=(1, 6, 10)))
    x, t, y = inputs(1, (2, 12, 20, 1))
    assert net(random_params(model), x, t, t, y).shape == x.shape


def test_flop_count_matches_xla_for_structured_and_unstructured_drop():
    """The unstructured fallback runs masked attention over all kept tokens and one-hot pooling:
    its extra FLOPs over the structured drop match XLA's count of the two programs."""
    counted, ours = {}, {}
    for structured in (True, False):
        c = cfg("S", video_shape=(4, 32, 32, 3), structured_drop=structured)
        model, net = dit.make_network(c)
        params = jax.eval_shape(lambda: nn.meta.unbox(dit.init_params(model, jax.random.key(0))))
        x, t, y = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), inputs(1, (4, 32, 32, 3)))
        keep = jax.ShapeDtypeStruct((1, 4 * 16 * 16 // 4), jnp.int32)
        counted[structured] = lowered_flops(lambda p, k, x, t, y: net(p, x, t, t, y, k), params, keep, x, t, y)
        ours[structured] = dit.count_flops(c).dropped
        assert counted[structured] == pytest.approx(ours[structured], rel=0.1)
    extra = ours[False] - ours[True]
    assert extra > 0.02 * ours[True]
    assert counted[False] - counted[True] == pytest.approx(extra, rel=0.1)
