"""The network as the objectives and samplers see it: a few pure functions of params.

Objectives never touch flax modules directly. They receive a `Network`, whose functions
are pure in (params, inputs). The split into `encode` (trunk) and `decode` (decoder blocks +
final layer) is what makes decoupled conditioning cheap (docs/METHOD.md section 7a): one trunk
pass at (x_t, t, condition) serves decoder queries at several s (s = t for the velocity, s for
the solution map, m for the MVA split). The trunk carries what the decoder needs of the
condition, so `decode` takes none. With joint conditioning `encode` only packs its inputs and
`decode` runs the whole network, so objectives need no second code path.

Conventions (docs/METHOD.md section 2): x has shape [B, T, H, W, C]; t, s are float [B];
the condition is a `flow.condition.Condition` (labels or text; `null` samples see the network's
learned null condition); the solution map is f(x, t, s) = x + (s - t) * F(x, t, s).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from eflow_jax.flow.condition import Condition

Params = Any
Trunk = Any  # Opaque pytree returned by `encode`.
WEAK_PATHS = ("drop_middle", "skip_half")
Keep = Any  # int32 [B, n_keep] token ids kept by the drop mask, or None for all tokens.


@dataclasses.dataclass(frozen=True)
class Network:
    """Pure functional view of F_theta(x_t, t, s, condition) with token drop and path drop.

    Attributes:
      encode: (params, x, t, cond, keep, weak) -> trunk. `keep` is the per-sample kept-token
        ids (None = dense). `weak=True` (or 'drop_middle') skips the middle blocks (the
        Path-Drop weak path); weak='skip_half' runs every other middle block (STG-style).
      decode: (params, trunk, t, s) -> F with the shape of x.
      sample_keep: (rng, batch_size) -> keep, one structured random drop mask per sample;
        returns None when the network drops no tokens.
      decoupled: True when the trunk does not see s (so sharing one trunk across s is free).
    """

    encode: Callable[..., Trunk]
    decode: Callable[..., jax.Array]
    sample_keep: Callable[[jax.Array, int], Keep]
    decoupled: bool = True

    def __call__(self, params: Params, x, t, s, cond: Condition, keep: Keep = None) -> jax.Array:
        """F_theta(x, t, s, cond) through the full path (token-dropped when keep is given)."""
        return self.decode(params, self.encode(params, x, t, cond, keep, False), t, s)

    def weak(self, params: Params, x, t, cond: Condition, path: str = "drop_middle") -> jax.Array:
        """The weak velocity F^weak(x, t, t, cond), no token drop.

        path: 'drop_middle' (middle output replaced by mu, SPRINT) or 'skip_half' (every other
        middle block skipped, STG). Networks without blocks to skip treat both alike.
        """
        if path not in WEAK_PATHS:
            raise ValueError(f"weak path {path!r}; use one of {WEAK_PATHS} (objective.weak_path).")
        weak = True if path == "drop_middle" else path
        return self.decode(params, self.encode(params, x, t, cond, None, weak), t, t)

    def solution(self, params: Params, x, t, s, cond: Condition, keep: Keep = None) -> jax.Array:
        """The solution map f(x, t, s) = x + (s - t) F(x, t, s)."""
        F = self(params, x, t, s, cond, keep)
        return x + _bcast(s - t, x) * F


def frozen(params: Params) -> Params:
    """Params for a pass whose output is stop-gradient: the gradient is the same, and jax then
    does not linearize the pass (most of a training step's tracing time otherwise)."""
    return jax.lax.stop_gradient(params)


def _bcast(v: jax.Array, like: jax.Array) -> jax.Array:
    """Reshape a per-sample [B] vector to broadcast against a [B, ...] tensor."""
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim)).astype(like.dtype)
