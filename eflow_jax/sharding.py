"""Device mesh, logical-axis rules and the shardings of state and batches.

Models name *logical* axes on every weight ('embed', 'heads', 'mlp', ...). One rules table
maps them to mesh axes, so a parallelism strategy is a different table, not different model
code. The mesh has axes ('data', 'fsdp', 'tensor'): batches split over data x fsdp, weights
over fsdp (ZeRO-3 style) and tensor (Megatron-style heads/mlp split).
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (None = replicated). Order matters for flax: first match wins.
LOGICAL_RULES = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed_out", "tensor"),
    ("kv", None),
    ("layers", None),
    ("vocab", None),
    ("patch", None),
    ("freq", None),
    ("fuse", None),
    ("context", None),
)


def mesh_config(**overrides) -> ml_collections.ConfigDict:
    """ICI (within a slice) and DCN (across slices) sizes per axis; one -1 is filled in."""
    cfg = ml_collections.ConfigDict(dict(ici=dict(data=-1, fsdp=1, tensor=1),
                                         dcn=dict(data=1, fsdp=1, tensor=1)))
    cfg.update(overrides)
    return cfg


def _fill(sizes: dict, total: int, what: str) -> tuple[int, ...]:
    shape = [int(sizes[a]) for a in MESH_AXES]
    if shape.count(-1) > 1:
        raise ValueError(f"mesh.{what} has more than one -1 axis: {dict(sizes)}; set all but one.")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if total % known:
            raise ValueError(f"mesh.{what}={dict(sizes)}: {total} devices are not divisible by {known}.")
        shape[shape.index(-1)] = total // known
    if math.prod(shape) != total:
        raise ValueError(
            f"mesh.{what}={dict(sizes)} covers {math.prod(shape)} devices but there are {total}; "
            f"make the product equal {total} (or use -1 on one axis)."
        )
    return tuple(shape)


def make_mesh(cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
    """Builds the ('data', 'fsdp', 'tensor') mesh, validating sizes against the device count."""
    devices = list(devices if devices is not None else jax.devices())
    num_slices = 1 + max(getattr(d, "slice_index", 0) for d in devices)
    dcn = _fill(cfg.dcn, num_slices, "dcn")
    ici = _fill(cfg.ici, len(devices) // num_slices, "ici")
    if num_slices > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        try:
            grid = mesh_utils.create_device_mesh(ici, devices)
        except (ValueError, NotImplementedError, AssertionError):  # Fake/odd topologies.
            grid = np.asarray(devices).reshape(ici)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def logical_to_sharding(boxed_abstract, mesh: Mesh):
    """Shardings for a pytree whose leaves may be flax LogicallyPartitioned boxes."""
    import flax.linen as nn

    specs = nn.get_partition_spec(boxed_abstract)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def to_global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Per-process numpy batch -> global jax.Arrays split over the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), local_batch)


def describe(mesh: Mesh) -> str:
    """One log line on the topology, so multi-host issues show up at start."""
    d0 = jax.devices()[0]
    return (f"process {jax.process_index()}/{jax.process_count()}, {jax.local_device_count()} local / "
            f"{jax.device_count()} global devices ({d0.platform}, {getattr(d0, 'device_kind', '?')}), "
            f"mesh {dict(mesh.shape)}")
