"""The device mesh, the logical-axis rules, and placing params, optimizer state and batches on it.

Mesh axes ('stage', 'data', 'expert', 'tensor'), any of size 1:
- 'stage'  pipeline ranks (parallel/pipeline/);
- 'data'   data parallelism; the optimizer state is also sharded over it (ZeRO-1);
- 'expert' expert parallelism: routed experts are split over it, and it is a data-parallel axis for
           everything else (the batch is sharded over ('data', 'expert'), as in DeepSeek-V3 where EP
           spans the data-parallel ranks);
- 'tensor' tensor parallelism of attention heads, dense MLP widths and the vocabulary.

Axis types are Auto, deliberately: outside the explicit shard_maps (expert dispatch, pipeline) we let
XLA's partitioner propagate shardings from the params and the batch. Explicit axes would make every
op need a sharding rule, and some we rely on have none (`lax.ragged_dot`, top-k under `nn.scan`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("stage", "data", "expert", "tensor")
BATCH_AXES = ("data", "expert")

# Logical axis name (model/ parameter annotations) -> mesh axis. Unlisted names are replicated.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("expert", "expert"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None), ("embed", None), ("q_lora", None), ("kv_lora", None), ("router", None),
    ("expert_mlp", None), ("mtp_concat", None),
)


def mesh_shape(parallel: ml_collections.ConfigDict) -> tuple[int, ...]:
    """(stage, data, expert, tensor) sizes from `config.parallel`."""
    return tuple(int(parallel.get(axis, 1)) for axis in AXES)


def make_mesh(parallel: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The 4-axis mesh of `config.parallel` over the first stage x data x expert x tensor of `devices`
    (default: the devices of all processes, in process order).

    Raises ValueError naming the config fields when the axis sizes ask for more devices than there are.
    """
    shape = mesh_shape(parallel)
    devices = list(jax.devices() if devices is None else devices)
    if any(s < 1 for s in shape) or math.prod(shape) > len(devices):
        sizes = ", ".join(f"parallel.{a}={s}" for a, s in zip(AXES, shape))
        raise ValueError(f"{sizes} multiply to {math.prod(shape)} but there are {len(devices)} devices: "
                         "choose axis sizes (each >= 1) whose product is at most the device count.")
    devices = devices[:math.prod(shape)]
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


def batch_size_multiple(mesh: Mesh) -> int:
    """The number of batch shards: every global batch size must be a multiple of it."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def param_shardings(logical_specs: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree of logical PartitionSpecs (as from `model.logical_axes`)."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, RULES)


def zero1_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """`spec` further split over 'data' on the first dimension that can take it (ZeRO-1).

    The dimension must be unsharded and divisible by the 'data' size; leaves with no such dimension
    (scalars, tiny vectors) stay as they are.
    """
    data = mesh.shape["data"]
    if data == 1:
        return spec
    dims = list(spec) + [None] * (len(shape) - len(spec))
    for i, (axis, size) in enumerate(zip(dims, shape)):
        if axis is None and size % data == 0:
            dims[i] = "data"
            return PartitionSpec(*dims)
    return spec


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any, params_shardings: Any,
                        mesh: Mesh) -> Any:
    """Shardings of the optimizer state: each parameter-shaped leaf (Adam's moments) takes its
    parameter's sharding plus 'data' (ZeRO-1); other leaves (step counts) are replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def moment(leaf, param_sharding):
        return NamedSharding(mesh, zero1_spec(param_sharding.spec, leaf.shape, mesh))

    return optax.tree_map_params(tx, moment, abstract_opt_state, params_shardings,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over ('data', 'expert'); the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from this process's rows of the batch.

    With one process `batch` is the whole global batch; with several, each process passes only its
    contiguous block of rows (`process_rows`) and the global batch is their concatenation in process order.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def process_rows(global_batch_size: int) -> slice:
    """The rows of the global batch this process feeds (the same block every step)."""
    count, index = jax.process_count(), jax.process_index()
    if global_batch_size % count:
        raise ValueError(f"data.batch_size={global_batch_size} must be a multiple of the {count} processes.")
    rows = global_batch_size // count
    return slice(index * rows, (index + 1) * rows)
