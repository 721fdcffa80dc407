"""The training step with its gradients computed by a pipeline schedule: DeepSeek-V3 cut into stages.

Legend: B batch, T time, D model, V vocabulary, E routed experts, L MoE layers, S stages,
M micro-batches, b = B / M rows per micro-batch, R data shards.

The stage function is built from the model's own pieces (model/transformer.py):
    stage 0       DeepSeekV3.embed_and_dense, then its slice of the MoE stack
    stage s       MoE layers [s L/S, (s+1) L/S): `layer_stack(cfg, MOE, L/S)` on the stage's params
    stage S-1     ..., then DeepSeekV3.output_heads (final norm, head, the MTP modules, which reuse the
                  embedding and the head) and the losses (train/losses.py)
The stacked MoE parameters [L, ...] become stage parameters [S, L/S, ...]; everything else (embedding,
dense layers, norm, head, MTP) is "shared": used by the first or the last stage. In DualPipe the
first and last stages of both directions sit on ranks 0 and P-1, so each end holds the embedding and
the head, and MTP reuses them in place. With expert parallelism the routed experts of the stages and
of the MTP modules are split over 'expert' (`expert_specs`).

Every rank runs one SPMD program, so the first- and last-stage extras are applied with `lax.cond` on
the stage index. Memory trade-off: the trainer stores the shared parameters split over the ranks
(train/placement.py), but during the step every rank holds them gathered, with their gradient
accumulator (the embedding and head are V x D each), and every stash slot has room for the residuals
of the conditional parts, although only the end stages use them. The head and its losses run under
recomputation (model/remat.py's `head_policy`), so for the head those residuals are its input
[b, T, D], not its logits [b, T, V].

Micro-batch m is rows m, m + M, m + 2M, ... of the batch: with the batch's rows split over the data
shards in contiguous blocks (parallel/mesh.py), every micro-batch is then split the same way with no
data movement. Losses are split so that their sum over micro-batches, stages and data shards is
exactly the un-pipelined loss (train/losses.py): the token counts that normalise the cross entropies
are counted on the whole batch before the pipeline runs, and each MoE layer's sequence-wise balance
loss, a mean over a device's b / R sequences, enters with weight (b / R) / B. Expert counts are summed
over micro-batches, stages and data shards, then drive the same loss-free bias update as without a
pipeline.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from deepseek_jax import model as model_lib
from deepseek_jax.model import remat
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.layers import compute_dtype
from deepseek_jax.model.names import MOE
from deepseek_jax.model.transformer import DeepSeekV3, layer_stack
from deepseek_jax.ops.recipe import Recipe
from deepseek_jax.parallel import dispatch
from deepseek_jax.parallel import mesh as mesh_lib
from deepseek_jax.parallel.pipeline import execute, schedules
from deepseek_jax.parallel.pipeline.tables import Branch, Plan, build_plan
from deepseek_jax.train import losses
from deepseek_jax.train.step import Batch, TrainState, apply_update, mtp_weight


def check_stages(cfg: ModelConfig, num_stages: int) -> None:
    if cfg.num_moe_layers == 0 or cfg.num_moe_layers % num_stages:
        raise ValueError(
            f"pipelining splits the {cfg.num_moe_layers} MoE layers evenly over {num_stages} stages; set "
            f"config.model.num_hidden_layers so that num_hidden_layers - first_k_dense_replace is a positive "
            f"multiple of {num_stages}")


def split_variables(params, routing, num_stages: int):
    """(stage params [S, L/S, ...], shared params, stage routing [S, L/S, ...], shared routing)."""
    cut = lambda a: a.reshape((num_stages, a.shape[0] // num_stages) + a.shape[1:])  # noqa: E731
    shared = {k: v for k, v in params.items() if k != MOE}
    return (jax.tree.map(cut, params[MOE]), shared, jax.tree.map(cut, routing.get(MOE, {})),
            {k: v for k, v in routing.items() if k != MOE})


def merge_stage_tree(stage_tree, shared_tree) -> dict:
    """Inverse of `split_variables` for params-shaped trees (e.g. gradients)."""
    uncut = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731
    return {**shared_tree, MOE: jax.tree.map(uncut, stage_tree)}


def _weighted(stats: dict, batch_fraction: float) -> dict:
    """A MoE layer's stats with its balance loss weighted by its rows' share of the batch."""
    return {**stats, "balance_loss": stats["balance_loss"] * batch_fraction}


def make_stage_fn(cfg: ModelConfig, num_stages: int, batch_fraction: float, balance_alpha: float,
                  recipe: Recipe | None = None, expert_devices: int = 1, unrolled: bool = False):
    """The stage function for `execute.pipeline_gradients` (see the module docstring). With
    `expert_devices` > 1 the routed experts of the MoE stack and of the MTP modules are split over the
    mesh's 'expert' axis within each rank (`expert_specs`) and reached by all-to-all; everything else
    runs on each device's rows. `unrolled`: the stage's layers without a loop, so that in an
    interleaved F&B pair each half's all-to-alls share one computation with the other half's compute.

    ctx.batch: {'tokens', 'positions', 'segment_ids'} [b, T]; ctx.stage_consts: the stage's routing;
    ctx.consts: {'routing': shared routing, 'main_count': [], 'mtp_counts': [K], 'mtp_weight': []}.
    Returns ((y, loss contribution), stats) with stats {'layers': the slice's router stats (balance loss
    x b/B), 'head': {'terms': LossTerms, 'mtp_k': router stats}}.
    """
    check_stages(cfg, num_stages)
    cfg, experts = dispatch.pipeline_experts(cfg, expert_devices)
    model = DeepSeekV3(cfg, recipe=recipe, dispatch=experts)
    stack = layer_stack(cfg, MOE, cfg.num_moe_layers // num_stages, recipe=recipe, dispatch=experts,
                        unrolled=unrolled)
    num_balanced = losses.num_balanced_layers(cfg)
    dtype = compute_dtype(cfg)

    def stage_fn(params, x, ctx: execute.StageContext):
        batch, consts = ctx.batch, ctx.consts
        tokens, positions, segments = batch["tokens"], batch["positions"], batch["segment_ids"]
        shared_vars = {"params": params["shared"], "routing": consts["routing"]}
        x = lax.cond(ctx.stage == 0,
                     lambda: model.apply(shared_vars, tokens, positions, segments,
                                         method=DeepSeekV3.embed_and_dense)[0].astype(dtype),
                     lambda: x)
        x, (layer_stats, _) = stack.apply({"params": params["stage"], "routing": ctx.stage_consts},
                                          x, positions, segments, None, None)
        layer_stats = _weighted(layer_stats, batch_fraction)

        def head(shared, h):
            variables = {"params": shared, "routing": consts["routing"]}
            logits, mtp_logits, _, mtp_stats, _ = model.apply(variables, h, tokens, positions, segments,
                                                              method=DeepSeekV3.output_heads)
            terms = losses.loss_terms(logits, mtp_logits, tokens, segments)
            loss = losses.language_loss(terms, consts["mtp_weight"], (consts["main_count"], consts["mtp_counts"]))
            out = {"terms": terms, **{name: _weighted(s, batch_fraction) for name, s in mtp_stats.items()}}
            for name in mtp_stats:
                loss = loss + losses.balance_term(out[name]["balance_loss"], balance_alpha, num_balanced)
            return loss, out

        # Recomputed in the backward, so no stash slot holds the logits (model/remat.py: head_policy).
        head = jax.checkpoint(head, policy=remat.head_policy(cfg.remat), prevent_cse=False)

        def no_head(shared, h):
            shapes = jax.eval_shape(head, shared, h)
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        head_loss, head_stats = lax.cond(ctx.stage == num_stages - 1, head, no_head, params["shared"], x)
        loss = head_loss + losses.balance_term(layer_stats["balance_loss"], balance_alpha, num_balanced)
        return (x, loss.astype(jnp.float32)), {"layers": layer_stats, "head": head_stats}

    return stage_fn


def expert_specs(cfg: ModelConfig, mesh) -> tuple[dict, dict]:
    """PartitionSpecs inside the pipeline's shard_map, over the 'expert' axis only, of (the stage
    parameters [S, L/S, ...] after the stage axis, the shared parameters): the routed experts of the
    MoE stack and of the MTP modules split over 'expert' by the logical rules (parallel/mesh.py),
    everything else whole on every device of a rank."""
    rules = mesh_lib.logical_rules(mesh.shape[execute.AXIS])

    def to_mesh(spec):
        axes = nn.logical_to_mesh_axes(tuple(spec), rules)
        return P(*(a if a == "expert" else None for a in axes))

    logical = model_lib.logical_axes(cfg)["params"]
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    stage = jax.tree.map(lambda spec: P(None, *to_mesh(tuple(spec)[1:])), logical[MOE], is_leaf=is_spec)
    shared = jax.tree.map(to_mesh, {k: v for k, v in logical.items() if k != MOE}, is_leaf=is_spec)
    return stage, shared


def pipelined_grads(params, routing, batch: Batch, step, *, cfg: ModelConfig, train_cfg: ml_collections.ConfigDict,
                    plan: Plan, mesh, recipe: Recipe | None = None):
    """(grads, (metrics, router_stats)) as `jax.grad(step.loss_and_metrics, has_aux=True)` gives them."""
    schedule = plan.schedule
    S, M = schedule.num_stages, schedule.num_microbatches
    tokens, positions, segments = batch["tokens"], batch["positions"], batch["segment_ids"]
    B, T = tokens.shape
    if B % M:
        raise ValueError(f"the batch of {B} rows does not split into {M} micro-batches; make "
                         f"config.data.batch_size a multiple of config.parallel.microbatches")
    stage_params, shared_params, stage_routing, shared_routing = split_variables(params, routing, S)
    main_count, mtp_counts = losses.target_counts(tokens, segments, cfg.num_nextn_predict_layers)
    consts = {"routing": shared_routing, "main_count": main_count, "mtp_counts": mtp_counts,
              "mtp_weight": mtp_weight(train_cfg, step).astype(jnp.float32)}
    micro = lambda a: a.reshape((B // M, M) + a.shape[1:]).swapaxes(0, 1)  # noqa: E731  [M, b, ...]
    inputs = {"tokens": micro(tokens), "positions": micro(positions), "segment_ids": micro(segments)}
    shards = execute.data_shards(mesh)
    if (B // M) % shards:
        raise ValueError(f"micro-batches of {B // M} rows do not split over {shards} data shards; make "
                         f"config.data.batch_size a multiple of config.parallel.microbatches x parallel.data")
    expert_devices = dict(mesh.shape).get("expert", 1)
    stage_fn = make_stage_fn(cfg, S, 1.0 / (M * shards), train_cfg.balance_alpha, recipe, expert_devices,
                             unrolled=Branch.PAIR in plan.forward_branches)
    x_aval = jax.ShapeDtypeStruct((B // M, T, cfg.hidden_size), compute_dtype(cfg))
    specs = expert_specs(cfg, mesh) if expert_devices > 1 else (None, None)
    result = execute.pipeline_gradients(plan, stage_fn, stage_params, shared_params, inputs, mesh=mesh,
                                        x_aval=x_aval, stage_consts=stage_routing, consts=consts,
                                        stage_specs=specs[0], shared_specs=specs[1])
    grads = merge_stage_tree(result.grads["stage"], result.grads["shared"])
    head = jax.tree.map(lambda a: a.sum(0), result.stats["head"])  # Zero but for the last stage's.
    router_stats = {MOE: jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), result.stats["layers"])}
    router_stats.update({name: s for name, s in head.items() if name != "terms"})
    return grads, (losses.step_metrics(head["terms"], router_stats, result.loss, cfg), router_stats)


def pipelined_train_step(state: TrainState, batch: Batch, *, cfg: ModelConfig, train_cfg: ml_collections.ConfigDict,
                         tx: optax.GradientTransformation, plan: Plan | schedules.Schedule, mesh,
                         recipe: Recipe | None = None) -> tuple[TrainState, dict]:
    """train/step.py's `train_step` with the gradients computed by the pipeline `plan` on `mesh`.

    Same state, batch, metrics and update. Bind the keyword arguments and jit it, e.g.
        plan = tables.build_plan(schedules.make_schedule('dualpipe', 4, 8))
        step_fn = jax.jit(functools.partial(pipelined_train_step, cfg=cfg, train_cfg=t, tx=tx, plan=plan,
                                            mesh=execute.make_stage_mesh(4)), donate_argnums=(0,))
    """
    if not isinstance(plan, Plan):
        plan = build_plan(plan)
    grads, (metrics, router_stats) = pipelined_grads(state.params, state.routing, batch, state.step, cfg=cfg,
                                                     train_cfg=train_cfg, plan=plan, mesh=mesh, recipe=recipe)
    return apply_update(state, grads, metrics, router_stats, train_cfg, tx)


def make_plan(schedule: str, num_ranks: int, num_microbatches: int, expert_devices: int = 1,
              interleave_pairs: bool | None = None) -> Plan:
    """The plan the trainer runs: `schedule` (schedules.SCHEDULES) on `num_ranks` ranks, its F&B pairs
    interleaved (tables.py) when `interleave_pairs`, by default when experts are split over
    `expert_devices` > 1 devices (there are all-to-alls to hide)."""
    interleave = expert_devices > 1 if interleave_pairs is None else interleave_pairs
    return build_plan(schedules.make_schedule(schedule, num_ranks, num_microbatches), interleave)


def make_pipelined_step(cfg: ModelConfig, train_cfg: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                        schedule: str, num_ranks: int, num_microbatches: int, recipe: Recipe | None = None,
                        mesh=None, interleave_pairs: bool | None = None):
    """(state, batch) -> (state, metrics), unjitted, for a training loop: the schedule named
    `schedule` (schedules.SCHEDULES) over `mesh`'s 'stage' axis of `num_ranks` devices, with
    data parallelism over its other axes (default: a 'stage'-only mesh of the first devices).
    `interleave_pairs` (default: when the mesh has an 'expert' axis, i.e. all-to-alls to hide): run each
    F&B pair's F and I as one computation (tables.py), the stage's layers unrolled."""
    mesh = execute.make_stage_mesh(num_ranks) if mesh is None else mesh
    plan = make_plan(schedule, num_ranks, num_microbatches, dict(mesh.shape).get("expert", 1), interleave_pairs)
    check_stages(cfg, plan.schedule.num_stages)
    return functools.partial(pipelined_train_step, cfg=cfg, train_cfg=train_cfg, tx=tx, plan=plan, mesh=mesh,
                             recipe=recipe)
