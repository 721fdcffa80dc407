"""Where the train state lives on a mesh, and building it there directly.

Params follow the run's logical-axis rules (parallel/mesh.py: routed experts over 'expert', heads / MLP
widths / vocabulary over 'tensor', replicated over 'data'); with a pipeline, the stacked MoE layers
[L, ...] are split over 'stage' on L, so each rank stores the layers of its own stages (rank r: stage
r when there are as many stages as ranks) and the pipeline step fetches the copies its schedule
places elsewhere (DualPipe's second stage per rank); the other parameters (embedding, head, dense
layers, MTP) are split over 'stage' on their first free dimension and gathered by the step. Adam's
moments take their parameter's sharding plus its data-parallel axes (ZeRO-1: ('data', 'expert') but
for the routed experts, parallel/mesh.py's `zero1_spec`); counters and the balancing biases are
replicated. The state is created
by one jitted init whose outputs already have these shardings, so no device ever holds a full
replicated copy of a sharded leaf.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deepseek_jax import model
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.parallel import mesh as mesh_lib
from deepseek_jax.train import step as step_lib


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: mesh_lib.Rules | None = None) -> step_lib.TrainState:
    """A TrainState whose leaves are the NamedShardings of the real state's leaves, params by `rules`
    (default: those of a run on `mesh`, parallel/mesh.py)."""
    variables = variable_shardings(cfg, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_params = model.abstract_variables(cfg)["params"]
    opt_state = mesh_lib.opt_state_shardings(tx, jax.eval_shape(tx.init, abstract_params), variables["params"],
                                             mesh)
    return step_lib.TrainState(step=replicated, params=variables["params"], opt_state=opt_state,
                               routing=variables["routing"], bad_steps=replicated, skipped_steps=replicated)


def variable_shardings(cfg: ModelConfig, mesh: Mesh, rules: mesh_lib.Rules | None = None) -> dict:
    """{'params': by the logical rules, 'routing': replicated} NamedShardings of the model's variables.

    With a pipeline, a parameter the rules do not put on 'stage' (everything but the MoE stack, which
    the stages own) is split over 'stage' on its first free dimension, so no rank stores a whole
    embedding or head; the pipeline step gathers them where its end stages run them.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    params = mesh_lib.param_shardings(model.logical_axes(cfg)["params"], mesh, rules)
    if mesh.shape["stage"] > 1:
        params = jax.tree.map(
            lambda s, a: NamedSharding(mesh, mesh_lib.split_free_dim(s.spec, a.shape, mesh, "stage")), params,
            model.abstract_variables(cfg)["params"], is_leaf=lambda x: isinstance(x, NamedSharding))
    return {"params": params,
            "routing": jax.tree.map(lambda _: replicated, model.abstract_variables(cfg)["routing"])}


def init_sharded_state(cfg: ModelConfig, tx: optax.GradientTransformation, key: jax.Array,
                       mesh: Mesh, rules: mesh_lib.Rules | None = None) -> step_lib.TrainState:
    """`step.init_state` computed under jit straight into `state_shardings`."""
    shardings = state_shardings(cfg, tx, mesh, rules)
    with jax.set_mesh(mesh):
        return jax.jit(lambda k: step_lib.init_state(cfg, tx, k), out_shardings=shardings)(key)


def per_device_bytes(tree) -> dict[jax.Device, int]:
    """Bytes each device holds of `tree`'s arrays (its addressable shards)."""
    total: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            total[shard.device] = total.get(shard.device, 0) + shard.data.nbytes
    return total


def host_value(value) -> np.ndarray:
    """A replicated array as NumPy, also when it spans devices of other processes."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        value = value.addressable_data(0)
    return np.asarray(value)
