"""Text conditioning in the DiT: cross-attention to masked text tokens in the trunk, a learned null
text token, token drop and decoupling unchanged, and the cost model counting the cross-attention."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eflow_jax.flow.condition import Condition
from eflow_jax.models import dit

L, DC = 6, 12


def text_cfg(variant="tiny", **overrides):
    base = dict(video_shape=(4, 16, 16, 3), patch=(1, 4, 4), tile=(2, 4, 4), cell=(1, 4, 4),
                drop_group=(1, 2, 2), dtype="float32", num_classes=0, context_dim=DC, context_len=L,
                attention_impl="xla")
    return dit.model_config(variant, **(base | overrides))


def random_params(model, seed=0, scale=0.05):
    """Every param non-zero (zero-init output layers would hide what the text does)."""
    params = nn.meta.unbox(dit.init_params(model, jax.random.key(seed)))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves, strict=True)])


def inputs(batch=3, seed=3):
    ks = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(ks[0], (batch, 4, 16, 16, 3))
    t = jax.random.uniform(ks[1], (batch,), minval=0.2, maxval=1.0)
    text = jax.random.normal(ks[2], (batch, L, DC))
    lengths = jnp.array([1, 3, L])[:batch]
    mask = jnp.arange(L)[None] < lengths[:, None]
    return x, t, Condition.of_text(text, mask)


@pytest.fixture(scope="module")
def text_model():
    model, net = dit.make_network(text_cfg())
    return model, net, random_params(model)


def test_padding_tokens_are_never_seen(text_model):
    _, net, params = text_model
    x, t, cond = inputs()
    out = net(params, x, t, 0.5 * t, cond)
    garbage = jnp.where(cond.text_mask[:, :, None], cond.text, 100.0)  # Change only the padding.
    np.testing.assert_allclose(net(params, x, t, 0.5 * t, cond._replace(text=garbage)), out, atol=1e-5)
    # A real token does matter (so the check above can fail).
    moved = cond._replace(text=cond.text.at[:, 0].add(1.0))
    assert float(jnp.abs(net(params, x, t, 0.5 * t, moved) - out).max(axis=(1, 2, 3, 4)).min()) > 1e-5


def test_null_text_is_a_learned_token_independent_of_the_caption(text_model):
    _, net, params = text_model
    x, t, cond = inputs()
    null = net(params, x, t, t, cond.nulled())
    other = cond._replace(text=-cond.text, text_mask=jnp.ones_like(cond.text_mask))
    np.testing.assert_array_equal(null, net(params, x, t, t, other.nulled()))
    assert float(jnp.abs(null - net(params, x, t, t, cond)).max(axis=(1, 2, 3, 4)).min()) > 1e-5
    # The null token is a parameter: it changes with it (so CFG and the weak reference learn it).
    bumped = jax.tree_util.tree_map_with_path(
        lambda path, p: p + 0.5 if "null_text" in jax.tree_util.keystr(path) else p, params)
    assert float(jnp.abs(net(bumped, x, t, t, cond.nulled()) - null).max()) > 1e-5


def test_cross_attention_lives_in_the_trunk_when_decoupled():
    decoupled = nn.meta.unbox(dit.init_params(dit.EFlowDiT(text_cfg()), jax.random.key(0)))
    joint = nn.meta.unbox(dit.init_params(dit.EFlowDiT(text_cfg(decoupled=False)), jax.random.key(0)))
    for part in ("encoder", "middle"):
        assert all("cross" in block for block in decoupled[part].values())
    assert not any("cross" in block for block in decoupled["decoder"].values())
    assert all("cross" in block for block in joint["decoder"].values())
    assert "null_text" in decoupled["text_embed"] and "y_embed" not in decoupled


def test_token_drop_invariance_and_decoupling_hold_with_text(text_model):
    model, net, params = text_model
    x, t, cond = inputs()
    layout = dit.layout_of(text_cfg())
    keep_all = jnp.tile(jnp.arange(layout.num_tokens)[None], (3, 1))
    np.testing.assert_allclose(net(params, x, t, 0.5 * t, cond, keep_all), net(params, x, t, 0.5 * t, cond),
                               atol=1e-5)
    dropped = net(params, x, t, 0.5 * t, cond, net.sample_keep(jax.random.key(4), 3))
    assert dropped.shape == x.shape
    grad_s = jax.grad(lambda s: jnp.sum(model.apply({"params": params}, x, t, s, cond,
                                                    method=dit.EFlowDiT.trunk_tokens)))(0.5 * t)
    np.testing.assert_array_equal(grad_s, 0.0)


def test_wrong_condition_kind_is_a_clear_error(text_model):
    _, net, params = text_model
    x, t, _ = inputs()
    with pytest.raises(ValueError, match="model.context_dim"):
        net(params, x, t, t, Condition.of_labels(jnp.zeros((3,), jnp.int32)))


def test_flop_count_includes_cross_attention():
    cfg = text_cfg(variant="S", video_shape=(4, 32, 32, 3), context_len=16, context_dim=32)
    model, net = dit.make_network(cfg)
    params = jax.eval_shape(lambda: nn.meta.unbox(dit.init_params(model, jax.random.key(0))))
    spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), dit.dummy_condition(cfg, 1))
    x = jax.ShapeDtypeStruct((1, 4, 32, 32, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    keep = jax.ShapeDtypeStruct((1, dit.layout_of(cfg).num_keep), jnp.int32)

    def counted(fn, *args):
        return float(jax.jit(fn).lower(*args).cost_analysis()["flops"])

    ours = dit.count_flops(cfg)
    plain = dit.count_flops(text_cfg(variant="S", video_shape=(4, 32, 32, 3), context_dim=0, num_classes=3))
    for kind, keep_arg in (("full", None), ("dropped", keep)):
        xla = counted(lambda p, x, t, c, k: net(p, x, t, t, c, k), params, x, t, spec, keep_arg)
        assert xla == pytest.approx(getattr(ours, kind), rel=0.1), kind
        assert getattr(ours, kind) > 1.02 * getattr(plain, kind)  # The cross-attention is counted.


def test_padded_keys_are_aligned_and_change_nothing():
    """attend pads a ragged key count (77-token captions) to KV_ALIGN for cuDNN; masked keys never count."""
    from eflow_jax.models import attention

    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (2, 8, 2, 16))
    k, v = (jax.random.normal(kk, (2, 5, 2, 16)) for kk in ks[1:])
    lengths = jnp.array([2, 5], jnp.int32)
    out = attention.attend(q, k, v, implementation="xla", kv_lengths=lengths)
    ref = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="xla")
    np.testing.assert_allclose(out, ref, atol=1e-6)
    seen = []
    real = jax.nn.dot_product_attention
    try:
        jax.nn.dot_product_attention = lambda q, k, v, **kw: seen.append(k.shape[1]) or real(q, k, v, **kw)
        attention.attend(q, k, v, implementation="xla", kv_lengths=lengths)
    finally:
        jax.nn.dot_product_attention = real
    assert seen == [attention.KV_ALIGN]
