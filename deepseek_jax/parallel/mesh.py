"""The device mesh, the logical-axis rules, and placing params, optimizer state and batches on it.

Mesh axes ('stage', 'data', 'expert', 'tensor'), any of size 1:
- 'stage'  pipeline ranks (parallel/pipeline/);
- 'data'   data parallelism; the optimizer state is also sharded over it (ZeRO-1), and over 'expert'
           too for every parameter 'expert' does not split;
- 'expert' expert parallelism: routed experts are split over it, and it is a data-parallel axis for
           everything else (the batch is sharded over ('data', 'expert'), as in DeepSeek-V3 where EP
           spans the data-parallel ranks);
- 'tensor' tensor parallelism of attention heads, dense MLP widths and the vocabulary.

Axis types are Auto, deliberately: outside the explicit shard_maps (expert dispatch, pipeline) we let
XLA's partitioner propagate shardings from the params and the batch. Explicit axes would make every
op need a sharding rule, and some we rely on have none (`lax.ragged_dot`, top-k under `nn.scan`).

Sharding is declared once: every parameter carries logical axis names (model/), and `logical_rules`
maps them to mesh axes for a run, from its `config.parallel`: the house rules below, the MoE stack's
layer axis ('stage') over the pipeline ranks when there is a pipeline, and `parallel.rules` overrides
(e.g. "vocab=,heads=tensor"). Everything else derives from the resulting parameter shardings: with a
pipeline, the parameters the stages do not own (embedding, head, dense layers, MTP) are split over
'stage' too, on their first free dimension (train/placement.py); Adam's moments add the axes the
parameter is data-parallel over, ('data', 'expert') or, for routed experts, 'data' (ZeRO-1,
`opt_state_shardings`); the batch is split over BATCH_AXES.
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
Rules = tuple[tuple[str, Any], ...]

# Logical axis name (model/ parameter annotations) -> mesh axis, without a pipeline. Unlisted names are
# replicated. 'stage' is the MoE stack's layer axis (model/names.py), split over the ranks of a pipeline.
HOUSE_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("expert", "expert"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("stage", None), ("layers", None), ("embed", None), ("q_lora", None), ("kv_lora", None), ("router", None),
    ("expert_mlp", None), ("mtp_concat", None), ("index_heads", None), ("index_head", None),
)
# The rules the dispatch and the pipeline are built around: `parallel.rules` cannot move them.
STRUCTURAL = ("batch", "expert", "stage")


def logical_rules(stage: int = 1, overrides: str = "") -> Rules:
    """The rules of a run with `stage` pipeline ranks (the MoE stack's layers over 'stage' when > 1),
    updated by `overrides`: "name=axis,name=axis+axis,name=" (an empty axis replicates)."""
    rules = dict(HOUSE_RULES)
    if stage > 1:
        rules["stage"] = "stage"
    for item in filter(None, (part.strip() for part in overrides.split(","))):
        name, sep, axes = item.partition("=")
        name = name.strip()
        mesh_axes = tuple(a.strip() for a in axes.split("+") if a.strip())
        problem = (
            "is not name=axis" if not sep else
            f"names no logical axis (known: {sorted(rules)})" if name not in rules else
            f"moves {name!r}, which the expert dispatch and the pipeline rely on" if name in STRUCTURAL else
            f"names a mesh axis outside {AXES}" if any(a not in AXES for a in mesh_axes) else
            "names a mesh axis twice" if len(set(mesh_axes)) < len(mesh_axes) else "")
        if problem:
            raise ValueError(f"config.parallel.rules: {item!r} {problem}. Fix: write name=axis pairs, e.g. "
                             "'vocab=,heads=tensor', for the parameters' logical names.")
        rules[name] = mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None)
    return tuple(rules.items())


def run_rules(parallel: ml_collections.ConfigDict) -> Rules:
    """The logical rules of the run `config.parallel` describes."""
    return logical_rules(int(parallel.get("stage", 1)), parallel.get("rules", ""))


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


def param_shardings(logical_specs: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """NamedShardings for a pytree of logical PartitionSpecs (as from `model.logical_axes`), by `rules`
    (default: those of a run on `mesh` without overrides)."""
    rules = logical_rules(mesh.shape["stage"]) if rules is None else rules
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def split_free_dim(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh,
                   axis: str | tuple[str, ...]) -> PartitionSpec:
    """`spec` further split over mesh `axis` (or jointly over several axes) on the first dimension
    that can take it: unsharded and divisible by the axes' product. Axes the spec already uses, or of
    size 1, are left out; leaves with no such dimension (scalars, tiny vectors) stay as they are."""
    dims = list(spec) + [None] * (len(shape) - len(spec))
    used = {a for d in dims if d is not None for a in (d if isinstance(d, tuple) else (d,))}
    axes = tuple(a for a in ((axis,) if isinstance(axis, str) else axis) if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes:
        return spec
    for i, (current, length) in enumerate(zip(dims, shape)):
        if current is None and length % size == 0:
            dims[i] = axes[0] if len(axes) == 1 else axes
            return PartitionSpec(*dims)
    return spec


def zero1_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """`spec` further split over the data-parallel axes of its leaf (ZeRO-1): ('data', 'expert')
    jointly for a parameter replicated over both (every one but the routed experts, for which 'expert'
    is model parallelism), on the first dimension that can take it; 'data' alone where no dimension
    divides by both."""
    joint = split_free_dim(spec, shape, mesh, BATCH_AXES)
    return joint if joint != spec else split_free_dim(spec, shape, mesh, "data")


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any, params_shardings: Any,
                        mesh: Mesh) -> Any:
    """Shardings of the optimizer state: each parameter-shaped leaf (Adam's moments) takes its
    parameter's sharding plus its data-parallel axes (ZeRO-1, `zero1_spec`); other leaves (step counts)
    are replicated."""
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
