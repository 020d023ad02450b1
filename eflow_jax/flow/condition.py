"""What a sample is conditioned on: a class label, text tokens with a mask, or the null condition.

Objectives and samplers pass a `Condition` to the network and never build a "null label" or an
"empty prompt" themselves: they mark samples `null` (condition drop, CFG's unconditional half, the
path-drop weak reference) and the network substitutes its own learned null condition (the null
label row of its label table, a learned null text token). So every objective and sampler works
unchanged for class-conditional and text-conditional runs.

A Condition is a pytree (absent fields are None), so it can be sliced, concatenated and passed
through jit like the arrays beside it:

    cond = Condition.of_labels(y)                 # y int32 [B]
    cond = Condition.of_text(emb_bld, mask_bl)    # text-encoder states [B, L, D], bool [B, L]
    cond.nulled(drop_b)                           # the same, null where drop_b (or everywhere)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Condition(NamedTuple):
    """Per-sample conditioning; every field leads with the batch axis.

    Attributes:
      null: bool [B]: True where the network must see its learned null condition instead.
      label: int32 [B] class labels, or None (text-conditional runs).
      text: [B, L, D] text-encoder states (bf16 or float32), or None (class-conditional runs).
      text_mask: bool [B, L], True on real tokens (a prefix), or None.
    """

    null: jax.Array
    label: jax.Array | None = None
    text: jax.Array | None = None
    text_mask: jax.Array | None = None

    @classmethod
    def of_labels(cls, label: jax.Array) -> Condition:
        label = jnp.asarray(label).astype(jnp.int32)
        return cls(jnp.zeros(label.shape, bool), label=label)

    @classmethod
    def of_text(cls, text: jax.Array, text_mask: jax.Array, label: jax.Array | None = None) -> Condition:
        text_mask = jnp.asarray(text_mask).astype(bool)
        return cls(jnp.zeros(text_mask.shape[:1], bool), label=None if label is None else jnp.asarray(label, jnp.int32),
                   text=jnp.asarray(text), text_mask=text_mask)

    def nulled(self, mask: jax.Array | None = None) -> Condition:
        """The null condition where `mask` (bool [B]) is True, or for every sample (mask None)."""
        null = jnp.ones_like(self.null) if mask is None else self.null | mask.astype(bool)
        return self._replace(null=null)

    def labels(self, null_index: int) -> jax.Array:
        """The label a label table sees: `null_index` where the sample is null."""
        return jnp.where(self.null, null_index, self.label).astype(jnp.int32)


def take(cond: Condition, start: int, stop: int | None = None) -> Condition:
    """Samples start..stop of every field."""
    return jax.tree.map(lambda a: a[start:stop], cond)


def join(*conds: Condition) -> Condition:
    """Sub-batches' conditions as one batch (their fields must be present alike)."""
    return jax.tree.map(lambda *a: jnp.concatenate(a), *conds)


def from_batch(batch: dict, *, labels: bool, text: bool) -> Condition:
    """The condition of a training or evaluation batch: its class labels ('label' [B]) and/or its text
    embeddings ('text_embedding' [B, L, D] + 'text_mask' [B, L]), as the model takes them."""
    null = jnp.zeros(batch["video"].shape[:1], bool)
    return Condition(null, label=jnp.asarray(batch["label"], jnp.int32) if labels else None,
                     text=batch["text_embedding"] if text else None,
                     text_mask=jnp.asarray(batch["text_mask"], bool) if text else None)
