"""DeepSeek-V3 cut into pipeline stages, and the pipelined training step.

Legend: B batch, T time, D model, V vocabulary, E routed experts, L MoE layers, S stages,
M micro-batches, b = B / M rows per micro-batch.

    stage 0       embedding, the dense layers, MoE layers [0, L/S)
    stage s       MoE layers [s L/S, (s+1) L/S)
    stage S-1     ..., then final norm, output head, the MTP modules (which reuse the embedding and
                  the head) and the losses
The stacked MoE parameters [L, ...] become stage parameters [S, L/S, ...]; everything else (embedding,
dense layers, norm, head, MTP) is "shared": used by the first or the last stage. In DualPipe the
first and last stages of both directions sit on ranks 0 and P-1, so each end holds the embedding and
the head, and MTP reuses them in place.

Every rank runs one SPMD program, so the first- and last-stage extras are applied with `lax.cond` on
the stage index. Memory trade-off: every rank holds the shared parameters and their gradient
accumulator (the embedding and head are V x D each), and every stash slot has room for the
residuals of the conditional parts (for the head, logits-sized), although only the end stages use
them.

Micro-batch m is rows m, m + M, m + 2M, ... of the batch: with the batch's rows split over the data
shards in contiguous blocks (parallel/mesh.py), every micro-batch is then split the same way with no
data movement. Losses are split so that their sum over micro-batches, stages and data shards is
exactly the un-pipelined loss (train/step.py): the token counts that normalise the cross entropies
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

from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.layers import Matmul, compute_dtype
from deepseek_jax.model.mtp import shift_left
from deepseek_jax.model.transformer import DeepSeekV3, layer_stack
from deepseek_jax.parallel.pipeline import execute
from deepseek_jax.parallel.pipeline.schedules import Schedule
from deepseek_jax.parallel.pipeline.tables import Plan, build_plan
from deepseek_jax.train import balance, losses
from deepseek_jax.train.step import Batch, TrainState, apply_update, mtp_weight

STACK = "moe_layers"  # the stacked layers cut into stages


def check_stages(cfg: ModelConfig, num_stages: int) -> None:
    if cfg.num_moe_layers == 0 or cfg.num_moe_layers % num_stages:
        raise ValueError(
            f"pipelining splits the {cfg.num_moe_layers} MoE layers evenly over {num_stages} stages; set "
            f"config.model.num_hidden_layers so that num_hidden_layers - first_k_dense_replace is a positive "
            f"multiple of {num_stages}")


def split_variables(params, routing, num_stages: int):
    """(stage params [S, L/S, ...], shared params, stage routing [S, L/S, ...], shared routing)."""
    cut = lambda a: a.reshape((num_stages, a.shape[0] // num_stages) + a.shape[1:])  # noqa: E731
    shared = {k: v for k, v in params.items() if k != STACK}
    return (jax.tree.map(cut, params[STACK]), shared, jax.tree.map(cut, routing.get(STACK, {})),
            {k: v for k, v in routing.items() if k != STACK})


def merge_stage_tree(stage_tree, shared_tree) -> dict:
    """Inverse of `split_variables` for params-shaped trees (e.g. gradients)."""
    uncut = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731
    return {**shared_tree, STACK: jax.tree.map(uncut, stage_tree)}


class _Chunk(nn.Module):
    """One stage's slice of the MoE stack: x [b, T, D] -> (x, stats {[L/S, E], [L/S]})."""

    cfg: ModelConfig
    length: int
    matmul: Matmul | None = None

    @nn.compact
    def __call__(self, x, positions, segments):
        return layer_stack(self.cfg, True, self.length, self.matmul, STACK)(x, positions, segments)


def _embed(model: DeepSeekV3, tokens, positions, segments):
    x = model.embed_tokens(tokens)
    if model.cfg.num_dense_layers:
        x, _ = model.dense_layers(x, positions, segments)
    return x


def _head(model: DeepSeekV3, h, tokens, positions, segments):
    """As the end of DeepSeekV3.__call__: (logits, [MTP logits], MTP router stats)."""
    h = model.norm(h)
    logits = model.head(h)
    mtp_logits, stats = [], {}
    for k, module in enumerate(model.mtp, start=1):
        h, stats[f"mtp_{k - 1}"] = module(h, model.embed_tokens(shift_left(tokens, k)), positions, segments)
        mtp_logits.append(model.head(h))
    return logits, mtp_logits, stats


def make_stage_fn(cfg: ModelConfig, num_stages: int, batch_fraction: float, balance_alpha: float,
                  matmul: Matmul | None = None):
    """The stage function for `execute.pipeline_gradients` (see the module docstring).

    ctx.batch: {'tokens', 'positions', 'segment_ids'} [b, T]; ctx.stage_consts: the stage's routing;
    ctx.consts: {'routing': shared routing, 'main_count': [], 'mtp_counts': [K], 'mtp_weight': []}.
    Returns ((y, loss contribution), stats) with stats {'layers': {'expert_counts' [L/S, E],
    'balance_loss' [L/S] x b/B}, 'head': {main_sum, main_count, mtp_sums, mtp_counts, mtp_k stats}}.
    """
    check_stages(cfg, num_stages)
    if cfg.moe_dispatch == "ep":  # Inside the pipeline's shard_map each device routes its own rows.
        cfg = cfg.replace(moe_dispatch="ragged", moe_capacity_factor=0.0)
    model = DeepSeekV3(cfg, matmul=matmul)
    chunk = _Chunk(cfg, cfg.num_moe_layers // num_stages, matmul)
    num_mtp = cfg.num_nextn_predict_layers
    num_balance = cfg.num_moe_layers + (num_mtp if cfg.mtp_uses_moe else 0)
    dtype = compute_dtype(cfg)

    def stage_fn(params, x, ctx: execute.StageContext):
        batch, consts = ctx.batch, ctx.consts
        tokens, positions, segments = batch["tokens"], batch["positions"], batch["segment_ids"]
        shared_vars = {"params": params["shared"], "routing": consts["routing"]}
        x = lax.cond(ctx.stage == 0,
                     lambda: model.apply(shared_vars, tokens, positions, segments, method=_embed).astype(dtype),
                     lambda: x)
        x, layer_stats = chunk.apply({"params": {STACK: params["stage"]}, "routing": {STACK: ctx.stage_consts}},
                                     x, positions, segments)
        layer_stats = {"expert_counts": layer_stats["expert_counts"],
                       "balance_loss": layer_stats["balance_loss"] * batch_fraction}

        def head(h):
            logits, mtp_logits, mtp_stats = model.apply(shared_vars, h, tokens, positions, segments, method=_head)
            main_sum, main_count = losses.next_token_loss(logits, tokens, segments)
            loss = main_sum / jnp.maximum(consts["main_count"], 1.0)
            out = {"main_sum": main_sum, "main_count": main_count}
            if num_mtp:
                sums, counts = losses.mtp_losses(jnp.stack(mtp_logits), tokens, segments)
                loss = loss + consts["mtp_weight"] * jnp.mean(sums / jnp.maximum(consts["mtp_counts"], 1.0))
                out.update(mtp_sums=sums, mtp_counts=counts)
                for name, s in mtp_stats.items():
                    out[name] = {"expert_counts": s["expert_counts"],
                                 "balance_loss": s["balance_loss"] * batch_fraction}
                    if cfg.mtp_uses_moe:
                        loss = loss + balance_alpha / num_balance * out[name]["balance_loss"]
            return loss, out

        def no_head(h):
            shapes = jax.eval_shape(head, h)
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        head_loss, head_stats = lax.cond(ctx.stage == num_stages - 1, head, no_head, x)
        loss = head_loss + balance_alpha / num_balance * jnp.sum(layer_stats["balance_loss"])
        return (x, loss.astype(jnp.float32)), {"layers": layer_stats, "head": head_stats}

    return stage_fn


def pipelined_grads(params, routing, batch: Batch, step, *, cfg: ModelConfig, train_cfg: ml_collections.ConfigDict,
                    plan: Plan, mesh, matmul: Matmul | None = None):
    """(grads, (metrics, router_stats)) as `jax.grad(step.loss_and_metrics, has_aux=True)` gives them."""
    schedule = plan.schedule
    S, M = schedule.num_stages, schedule.num_microbatches
    tokens, positions, segments = batch["tokens"], batch["positions"], batch["segment_ids"]
    B, T = tokens.shape
    if B % M:
        raise ValueError(f"the batch of {B} rows does not split into {M} micro-batches; make "
                         f"config.data.batch_size a multiple of config.parallel.microbatches")
    num_mtp = cfg.num_nextn_predict_layers
    stage_params, shared_params, stage_routing, shared_routing = split_variables(params, routing, S)
    main_count = losses.shifted_targets(tokens, segments, 1)[1].sum()
    mtp_counts = jnp.stack([losses.shifted_targets(tokens, segments, k + 2)[1].sum() for k in range(num_mtp)]
                           ) if num_mtp else jnp.zeros((0,))
    consts = {"routing": shared_routing, "main_count": main_count, "mtp_counts": mtp_counts,
              "mtp_weight": mtp_weight(train_cfg, step).astype(jnp.float32)}
    micro = lambda a: a.reshape((B // M, M) + a.shape[1:]).swapaxes(0, 1)  # noqa: E731  [M, b, ...]
    inputs = {"tokens": micro(tokens), "positions": micro(positions), "segment_ids": micro(segments)}
    shards = execute.data_shards(mesh)
    if (B // M) % shards:
        raise ValueError(f"micro-batches of {B // M} rows do not split over {shards} data shards; make "
                         f"config.data.batch_size a multiple of config.parallel.microbatches x parallel.data")
    stage_fn = make_stage_fn(cfg, S, 1.0 / (M * shards), train_cfg.balance_alpha, matmul)
    x_aval = jax.ShapeDtypeStruct((B // M, T, cfg.hidden_size), compute_dtype(cfg))
    result = execute.pipeline_gradients(plan, stage_fn, stage_params, shared_params, inputs, mesh=mesh,
                                        x_aval=x_aval, stage_consts=stage_routing, consts=consts)
    grads = merge_stage_tree(result.grads["stage"], result.grads["shared"])
    head = jax.tree.map(lambda a: a.sum(0), result.stats["head"])  # Zero but for the last stage's.
    layer_stats = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), result.stats["layers"])
    router_stats = {}
    if cfg.num_dense_layers:  # dense layers report zeros (model/block.py), as without a pipeline
        router_stats["dense_layers"] = {
            "expert_counts": jnp.zeros((cfg.num_dense_layers, cfg.n_routed_experts), jnp.float32),
            "balance_loss": jnp.zeros((cfg.num_dense_layers,), jnp.float32)}
    router_stats[STACK] = layer_stats
    router_stats.update({f"mtp_{k}": head[f"mtp_{k}"] for k in range(num_mtp) if f"mtp_{k}" in head})
    main = head["main_sum"] / jnp.maximum(main_count, 1.0)
    metrics = {"main_loss": main, "tokens": head["main_count"]}
    if num_mtp:
        metrics["mtp_loss"] = jnp.mean(head["mtp_sums"] / jnp.maximum(head["mtp_counts"], 1.0))
    max_vio, balance_losses = balance.moe_stats(routing, router_stats)
    if balance_losses.size:
        metrics.update(balance_loss=balance_losses.mean(), max_vio=max_vio.mean(), max_vio_per_layer=max_vio)
    metrics["loss"] = result.loss
    return grads, (metrics, router_stats)


def pipelined_train_step(state: TrainState, batch: Batch, *, cfg: ModelConfig, train_cfg: ml_collections.ConfigDict,
                         tx: optax.GradientTransformation, plan: Plan | Schedule, mesh,
                         matmul: Matmul | None = None) -> tuple[TrainState, dict]:
    """train/step.py's `train_step` with the gradients computed by the pipeline `plan` on `mesh`.

    Same state, batch, metrics and update. Bind the keyword arguments and jit it, e.g.
        plan = tables.build_plan(schedules.make_schedule('dualpipe', 4, 8))
        step_fn = jax.jit(functools.partial(pipelined_train_step, cfg=cfg, train_cfg=t, tx=tx, plan=plan,
                                            mesh=execute.make_stage_mesh(4)), donate_argnums=(0,))
    """
    if not isinstance(plan, Plan):
        plan = build_plan(plan)
    grads, (metrics, router_stats) = pipelined_grads(state.params, state.routing, batch, state.step, cfg=cfg,
                                                     train_cfg=train_cfg, plan=plan, mesh=mesh, matmul=matmul)
    return apply_update(state, grads, metrics, router_stats, train_cfg, tx)


def make_pipelined_step(cfg: ModelConfig, train_cfg: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                        schedule: str, num_ranks: int, num_microbatches: int, matmul: Matmul | None = None,
                        latency: int = 1, mesh=None):
    """(state, batch) -> (state, metrics), unjitted, for a training loop: the schedule named
    `schedule` (schedules.SCHEDULES) over `mesh`'s 'stage' axis of `num_ranks` devices, with
    data parallelism over its other axes (default: a 'stage'-only mesh of the first devices)."""
    from deepseek_jax.parallel.pipeline import schedules

    plan = build_plan(schedules.make_schedule(schedule, num_ranks, num_microbatches), latency)
    check_stages(cfg, plan.schedule.num_stages)
    return functools.partial(pipelined_train_step, cfg=cfg, train_cfg=train_cfg, tx=tx, plan=plan,
                             mesh=execute.make_stage_mesh(num_ranks) if mesh is None else mesh, matmul=matmul)
