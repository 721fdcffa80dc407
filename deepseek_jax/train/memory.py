"""The memory plan of a training run: per-device bytes of every part of the state and of the step,
from shapes and shardings only (nothing is allocated, so it plans DeepSeek-V3 on 2048 devices here).

    plan_memory(config) -> MemoryPlan

The layout is `config.parallel` on an abstract mesh of stage x data x expert x tensor devices. Where
the figures come from:
- parameters, Adam moments: the run's own shardings (train/placement.py) applied to the model's
  shapes, `NamedSharding.shard_shape` per leaf; gradients as the optimizer receives them (the
  parameters' layout, float32);
- the pipeline step (parallel.stage > 1): the real pipelined train step traced with `jax.eval_shape`
  while parallel/pipeline/execute.py records its rank program's buffers: the module slots' stage
  parameters fetched from their owners, the gathered shared parameters (embedding, head, dense layers,
  MTP), the gradient accumulators of both, the inboxes, and the residuals one micro-batch stashes
  from F to B (and I to W): that is, the stage function's own residuals after its recomputation
  policy, so `remat` and the FP8 recipe (which keeps FP8 copies of the GEMM inputs) show in it;
- the stash at the simulator's peak: the most micro-batches any rank holds at once in the
  asynchronous timeline of the schedule (parallel/pipeline/simulate.py, Figure 5's costs), times one
  micro-batch's residuals; the executor's slots are listed beside it;
- the expert-parallel dispatch buffers of one MoE layer in flight, from the capacity rule of
  parallel/expert_parallel.py: send and receive buffers of the dispatch and the combine.
Every rank runs one SPMD program, so each line is what every device allocates.

A MoE stack that does not split evenly into the stages (DeepSeek-V3: 58 layers over 16 stages) is
planned with every stage as large as the largest; the plan says so in its notes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import AbstractMesh, AxisType

from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.layers import compute_dtype
from deepseek_jax.parallel import dispatch, expert_parallel
from deepseek_jax.parallel import mesh as mesh_lib
from deepseek_jax.parallel.pipeline import execute, schedules, simulate
from deepseek_jax.train import placement
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.precision import recipe_for
from deepseek_jax.train.pretrain import make_step
from deepseek_jax.train.validation import validate_parallel_config

GIB, MIB = 2**30, 2**20
# The stash lines every pipelined plan shows: (remat policy, FP8 recipe on).
STASH_VARIANTS = (("none", False), ("deepseek", False), ("deepseek", True))


@dataclasses.dataclass(frozen=True)
class Line:
    name: str
    bytes: int
    note: str = ""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes. `lines` add up to `total` (the run as configured); `stash_lines` compare the
    recomputation variants (one of them is the configured one, in `lines`)."""

    layout: str
    lines: tuple[Line, ...]
    stash_lines: tuple[Line, ...]
    notes: tuple[str, ...]
    rank_buffers: execute.RankBuffers | None = None  # the pipelined step's, as configured

    @property
    def total(self) -> int:
        return sum(line.bytes for line in self.lines)

    def format(self) -> str:
        width = max(len(line.name) for line in self.lines + self.stash_lines) + 2
        unit, size = ("GiB", GIB) if self.total >= GIB else ("MiB", MIB)
        row = lambda line: f"  {line.name:<{width}}{line.bytes / size:>10.2f} {unit}  {line.note}".rstrip()  # noqa: E731
        out = [f"Per device: {self.layout}", *map(row, self.lines),
               f"  {'total':<{width}}{self.total / size:>10.2f} {unit}"]
        if self.stash_lines:
            out += ["", "Activation stash at the simulator's peak, by recomputation (per device):",
                    *map(row, self.stash_lines)]
        return "\n".join(out + [""] + [f"Note: {n}" for n in self.notes])


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / MIB:.1f} MiB"


def abstract_mesh(parallel: ml_collections.ConfigDict) -> AbstractMesh:
    """The run's 4-axis mesh (parallel/mesh.py) as shapes only: no devices needed."""
    return AbstractMesh(mesh_lib.mesh_shape(parallel), mesh_lib.AXES, axis_types=(AxisType.Auto,) * len(mesh_lib.AXES))


def _per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def _even_stages(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, list[str]]:
    """`config` with the MoE stack rounded up to a multiple of the pipeline's stages, and a note."""
    p = config.parallel
    if p.stage == 1:
        return config, []
    cfg = ModelConfig.from_dict(config.model)
    stages = 2 * p.stage if p.pipeline == "dualpipev" else p.stage
    layers = cfg.num_moe_layers
    if layers and layers % stages == 0:
        return config, []
    per_stage = max(1, math.ceil(layers / stages))
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.num_hidden_layers = cfg.first_k_dense_replace + per_stage * stages
    return config, [f"the {layers} MoE layers do not split evenly into {stages} stages: planned with {per_stage} per "
                    f"stage (the largest stage; {per_stage * stages - layers} layer slots are padding)"]


def _abstract_state(cfg: ModelConfig, tx, mesh: AbstractMesh, rules) -> step_lib.TrainState:
    shapes = jax.eval_shape(lambda: step_lib.init_state(cfg, tx, jax.random.key(0)))
    shardings = placement.state_shardings(cfg, tx, mesh, rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def _rank_buffers(config: ml_collections.ConfigDict, mesh: AbstractMesh) -> execute.RankBuffers:
    """The pipelined step's per-rank buffers, traced with `jax.eval_shape` on the abstract mesh."""
    cfg = dispatch.training_model_config(config, ModelConfig.from_dict(config.model))
    tx = make_optimizer(config.train)
    rules = mesh_lib.run_rules(config.parallel)
    state = _abstract_state(cfg, tx, mesh, rules)
    split_rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh_lib.BATCH_AXES))
    rows = jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len), jnp.int32, sharding=split_rows)
    batch = {k: rows for k in ("tokens", "positions", "segment_ids")}
    step = make_step(config, cfg, tx, recipe_for(config), mesh=mesh)
    with execute.recording_rank_buffers() as log, jax.sharding.use_abstract_mesh(mesh):
        jax.eval_shape(step, state, batch)
    (buffers,) = log
    return buffers


def _variant(config: ml_collections.ConfigDict, remat: str, fp8: bool) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.remat = remat
    config.fp8.enabled = fp8
    return config


def simulated_peak(parallel: ml_collections.ConfigDict) -> int:
    """Most micro-batches' activations any rank holds at once in the schedule's asynchronous timeline
    (Figure 5's costs; DualPipe: stages + 1)."""
    schedule = schedules.make_schedule(parallel.pipeline, parallel.stage, parallel.microbatches)
    return max(simulate.simulate(schedule, simulate.CostModel()).peak_activations)


def dispatch_buffer_bytes(config: ml_collections.ConfigDict, cfg: ModelConfig) -> tuple[int, str]:
    """(bytes, how): the send and receive buffers of one MoE layer's dispatch and combine on one device
    for one micro-batch (or the whole batch without a pipeline), by expert_parallel.capacity."""
    p = config.parallel
    rows = config.data.batch_size // (p.microbatches if p.stage > 1 else 1) // (p.data * p.expert)
    n = rows * config.data.seq_len
    E_l = cfg.n_routed_experts // p.expert
    C = expert_parallel.capacity(n, cfg.num_experts_per_tok, E_l, p.expert, p.capacity_factor)
    slots = p.expert * C * cfg.hidden_size
    out_dtype = jnp.dtype(compute_dtype(cfg)).itemsize
    if config.fp8.enabled:  # FP8 payload with a float32 scale per 1 x tile block (dispatch only).
        payload = 1 + 4 / config.fp8.tile
    else:
        payload = out_dtype
    total = int(2 * slots * payload + 2 * slots * out_dtype)
    mode = "dropless" if p.capacity_factor == 0 else f"capacity factor {p.capacity_factor:g}"
    return total, (f"{mode}: {p.expert} destinations x C = {C:,} rows x D, send + receive, dispatch"
                   f"{' (FP8)' if config.fp8.enabled else ''} and combine")


def plan_memory(config: ml_collections.ConfigDict, stash_variants=STASH_VARIANTS) -> MemoryPlan:
    """The memory plan of the run `config` describes (see the module docstring), with a stash line per
    (remat policy, FP8) of `stash_variants`. Raises ValueError naming the field for a layout that does
    not divide."""
    p = config.parallel
    devices = math.prod(mesh_lib.mesh_shape(p))
    config, notes = _even_stages(config)
    cfg = ModelConfig.from_dict(config.model)
    validate_parallel_config(config, cfg, device_count=devices)
    mesh = abstract_mesh(p)
    tx = make_optimizer(config.train)
    state = _abstract_state(cfg, tx, mesh, mesh_lib.run_rules(p))
    params = _per_device(state.params)
    layout = (f"stage={p.stage} x data={p.data} x expert={p.expert} x tensor={p.tensor} = {devices:,} devices"
              + (f", {p.pipeline}, {p.microbatches} micro-batches" if p.stage > 1 else ""))
    lines = [Line("parameters", params + _per_device(state.routing), "as stored (float32 master weights)"),
             Line("gradients", params, "the parameters' layout"),
             Line("Adam moments", _per_device(state.opt_state), "ZeRO-1: over each parameter's data-parallel axes")]
    stash_lines = []
    if p.stage > 1:
        peak = simulated_peak(p)
        configured = _rank_buffers(config, mesh)
        lines += [
            Line("stage slots fetched", configured.slot_params, "the schedule's module slots, from their owners"),
            Line("shared parameters gathered", configured.shared_params, "embedding, head, dense layers, MTP"),
            Line("gradient accumulators", configured.stage_grads + configured.shared_grads, "slots + shared"),
            Line("activation stash", peak * configured.stash_slot,
                 f"remat={cfg.remat}{', FP8' if config.fp8.enabled else ''}: {peak} micro-batches of "
                 f"{_size(configured.stash_slot)} (executor: {configured.num_stash} slots)"),
            Line("weight-gradient stash", configured.num_wstash * configured.wstash_slot,
                 f"{configured.num_wstash} slots of I's outputs kept for W"),
            Line("inboxes", configured.inboxes, "activations and gradients in flight")]
        buffers = {(cfg.remat, bool(config.fp8.enabled)): configured}  # each variant traced once
        for remat, fp8 in stash_variants:
            if (remat, fp8) not in buffers:
                buffers[remat, fp8] = _rank_buffers(_variant(config, remat, fp8), mesh)
            variant = buffers[remat, fp8]
            stash_lines.append(Line(f"remat={remat}{' + FP8' if fp8 else ''}", peak * variant.stash_slot,
                                    f"{peak} micro-batches of {_size(variant.stash_slot)}"))
    if p.expert > 1:
        lines.append(Line("EP dispatch buffers", *dispatch_buffer_bytes(config, cfg)))
    return MemoryPlan(layout=layout, lines=tuple(lines), stash_lines=tuple(stash_lines), notes=tuple(notes),
                      rank_buffers=configured if p.stage > 1 else None)
