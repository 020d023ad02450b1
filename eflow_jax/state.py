"""TrainState and its sharded creation: shapes -> shardings -> init directly into shardings."""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from eflow_jax import sharding
from eflow_jax.models import dit


@flax.struct.dataclass
class TrainState:
    """Everything a bit-exact resume needs (the data iterator is checkpointed beside it)."""

    step: jax.Array  # int32 scalar: finished updates.
    params: dict
    ema_params: dict
    opt_state: optax.OptState
    rng: jax.Array  # Typed PRNG key; the step key is fold_in(rng, step).


def _boxed_state(model: dit.EFlowDiT, tx: optax.GradientTransformation, seed: int) -> TrainState:
    params_rng, state_rng = jax.random.split(jax.random.key(seed))
    params = dit.init_params(model, params_rng)  # Leaves are LogicallyPartitioned boxes.
    return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, ema_params=params,
                      opt_state=tx.init(params), rng=state_rng)


def state_shardings(model, tx, mesh: Mesh, seed: int = 0):
    """(abstract unboxed state with .sharding, shardings pytree), without allocating anything."""
    boxed = jax.eval_shape(lambda: _boxed_state(model, tx, seed))
    shardings = sharding.logical_to_sharding(boxed, mesh)
    shardings = jax.tree.map(
        lambda s: s if isinstance(s, NamedSharding) else NamedSharding(mesh, P()), shardings,
        is_leaf=lambda s: isinstance(s, (NamedSharding, P)))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            nn.meta.unbox(boxed), shardings)
    return abstract, shardings


def create_state(model, tx, mesh: Mesh, seed: int, shardings) -> TrainState:
    """Initialises params straight into their shardings (never materialised on one device)."""
    # The NamedShardings carry the mesh, so no mesh context is needed.
    return jax.jit(lambda: nn.meta.unbox(_boxed_state(model, tx, seed)), out_shardings=shardings)()
