"""The shard_map pipeline executor: pipelined == un-pipelined, W without the input chain, overlap in HLO.

A toy MLP stage (as in the DualPipe reference's tests) proves every schedule on 4 and 8 simulated
devices, alone and with data parallelism; the micro DeepSeek-V3 proves the cut into stages and the
train step for every schedule, on 'stage'-only meshes and on ('stage', 'data') meshes of 8 devices.
Programs are compiled with XLA's CPU backend optimisations off: compile time dominates here.
"""

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from common import micro_run_config
from jax.sharding import PartitionSpec as P

from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.experts import dense_dispatch
from deepseek_jax.ops.fp8 import Fp8Recipe
from deepseek_jax.parallel import dispatch as dispatch_lib
from deepseek_jax.parallel import mesh as mesh_lib
from deepseek_jax.parallel.expert_parallel import ExpertParallelInShardMap
from deepseek_jax.parallel.pipeline import execute, overlap, schedules
from deepseek_jax.parallel.pipeline.backward_split import split_stage
from deepseek_jax.parallel.pipeline.schedules import Kind
from deepseek_jax.parallel.pipeline.simulate import CostModel, peak_activations, tick_table
from deepseek_jax.parallel.pipeline.tables import Branch, build_plan, op_cost
from deepseek_jax.train import pipelined
from deepseek_jax.train import step as step_lib

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
D, B, LAYERS, IN, OUT = 16, 4, 2, 3, 2  # toy: width, rows per micro-batch, layers per stage, in/out width


def toy_stage(params, x, ctx):
    """Stage 0 embeds the micro-batch's input (shared w_in); the last stage scores (shared w_out)."""
    p, shared = params["stage"], params["shared"]
    num_stages = ctx.consts["stage_marker"].shape[0]
    x = jnp.where(ctx.stage == 0, jnp.tanh(ctx.batch["x"] @ shared["w_in"]), x)
    for layer in range(p["w"].shape[0]):
        x = jnp.tanh(x @ p["w"][layer] + p["b"][layer][None, :])
    pred = x @ shared["w_out"]
    loss = jnp.where(ctx.stage == num_stages - 1, 0.5 * jnp.sum((pred - ctx.batch["y"]) ** 2), 0.0)
    return (x, loss), {"x_sum": jnp.sum(x)}


def toy_problem(num_stages, num_microbatches, seed=0, width=D, rows=B):
    k = jax.random.split(jax.random.key(seed), 6)
    stage = {"w": jax.random.normal(k[0], (num_stages, LAYERS, width, width)) / np.sqrt(width),
             "b": jax.random.normal(k[1], (num_stages, LAYERS, width)) / 10}
    shared = {"w_in": jax.random.normal(k[2], (IN, width)), "w_out": jax.random.normal(k[3], (width, OUT)) / 4}
    inputs = {"x": jax.random.normal(k[4], (num_microbatches, rows, IN)),
              "y": jax.random.normal(k[5], (num_microbatches, rows, OUT))}
    return stage, shared, inputs, {"stage_marker": jnp.zeros((num_stages,))}


@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def toy_reference(stage, shared, inputs, consts):
    """Un-pipelined: every micro-batch through every stage in order; (loss, grads, stats [S])."""
    num_stages = stage["w"].shape[0]

    def one_microbatch(stage, shared, batch):
        x, total, stats = jnp.zeros((B, D)), 0.0, []
        for s in range(num_stages):
            ctx = execute.StageContext(batch, jnp.int32(s), {}, consts)
            (x, loss), st = toy_stage({"stage": jax.tree.map(lambda a: a[s], stage), "shared": shared}, x, ctx)
            total, stats = total + loss, stats + [st["x_sum"]]
        return total, jnp.stack(stats)

    def loss_fn(stage, shared):
        losses, stats = jax.vmap(one_microbatch, in_axes=(None, None, 0))(stage, shared, inputs)
        return losses.sum(), stats.sum(0)

    (loss, stats), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(stage, shared)
    return loss, {"stage": grads[0], "shared": grads[1]}, stats


def assert_close(actual, expected, rtol=1e-5):
    """Every leaf within rtol of the largest magnitude of its expected leaf."""
    chex.assert_trees_all_equal_structs(actual, expected)
    for (path, e), a in zip(jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(actual)):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        error = np.max(np.abs(a - e), initial=0.0) / max(np.max(np.abs(e), initial=0.0), 1e-12)
        assert error <= rtol, (jax.tree_util.keystr(path), error)


@pytest.mark.parametrize("name, num_ranks, interleave", [
    (name, ranks, False) for ranks in (4, 8) for name in ("gpipe", "1f1b", "zb_h1", "dualpipe", "dualpipev")] + [
    ("dualpipe", 4, True), ("dualpipe", 8, True), ("dualpipev", 4, True)])
def test_toy_pipeline_matches_unpipelined(name, num_ranks, interleave):
    schedule = schedules.make_schedule(name, num_ranks, 2 * num_ranks)
    plan = build_plan(schedule, interleave)
    # Buffers: the stash holds what the simulator counts as live activations in the executed timeline.
    _, executed = plan.timeline(op_cost(CostModel()))
    assert plan.num_stash == max(peak_activations(list(ops)) for ops in executed)
    stage, shared, inputs, consts = toy_problem(schedule.num_stages, schedule.num_microbatches)
    run = jax.jit(lambda st, sh, inp: execute.pipeline_gradients(
        plan, toy_stage, st, sh, inp, mesh=execute.make_stage_mesh(num_ranks),
        x_aval=jax.ShapeDtypeStruct((B, D), jnp.float32), consts=consts), compiler_options=FAST_COMPILE)
    result = run(stage, shared, inputs)
    loss, grads, stats = toy_reference(stage, shared, inputs, consts)
    assert_close(result.loss, loss)
    assert_close(result.grads, grads)
    assert_close(result.stats["x_sum"], stats)


def stage_data_mesh(stage: int, data: int):
    """The trainer's mesh (parallel/mesh.py: Auto axes) with a pipeline and data parallelism."""
    return mesh_lib.make_mesh(ml_collections.ConfigDict(dict(stage=stage, data=data, expert=1, tensor=1)))


def stage_expert_mesh(stage: int, data: int, expert: int):
    return mesh_lib.make_mesh(ml_collections.ConfigDict(dict(stage=stage, data=data, expert=expert, tensor=1)))


@pytest.mark.parametrize("name, ranks, data", [(name, 4, 2) for name in schedules.SCHEDULES] + [("dualpipev", 2, 4)])
def test_toy_pipeline_with_data_parallelism_matches_unpipelined(name, ranks, data):
    """Pipeline ranks x data shards: each shard runs its part of every micro-batch's rows. (DualPipeV
    on 2 ranks: each rank keeps one of its two stages in place and fetches the other.)"""
    schedule = schedules.make_schedule(name, ranks, 8)
    stage, shared, inputs, consts = toy_problem(schedule.num_stages, 8, seed=2)
    result = jax.jit(lambda st, sh, inp: execute.pipeline_gradients(
        build_plan(schedule), toy_stage, st, sh, inp, mesh=stage_data_mesh(ranks, data),
        x_aval=jax.ShapeDtypeStruct((B, D), jnp.float32), consts=consts), compiler_options=FAST_COMPILE)(
        stage, shared, inputs)
    loss, grads, stats = toy_reference(stage, shared, inputs, consts)
    assert_close(result.loss, loss)
    assert_close(result.grads, grads)
    assert_close(result.stats["x_sum"], stats)


NUM_EXPERTS, TOP_K, FFN = 8, 2, 8  # the toy MoE layer: routed experts, experts per row, expert width


def toy_moe_stage(experts):
    """A toy stage with a routed MoE layer: stage 0 embeds (shared w_in), one tanh layer, each row routed to
    its top-2 of 8 SwiGLU experts (router softmax), `experts(x, weights, indices, (gate, up, down))` adding
    their weighted output, the last stage scores (shared w_out)."""

    def stage_fn(params, x, ctx):
        p, shared = params["stage"], params["shared"]
        x = jnp.where(ctx.stage == 0, jnp.tanh(ctx.batch["x"] @ shared["w_in"]), x)
        x = jnp.tanh(x @ p["w"] + p["b"][None, :])
        weights, indices = jax.lax.top_k(jax.nn.softmax(x @ p["router"]), TOP_K)
        x = x + experts(x, weights, indices, (p["gate"], p["up"], p["down"]))
        pred = x @ shared["w_out"]
        loss = jnp.where(ctx.stage == ctx.consts["stage_marker"].shape[0] - 1,
                         0.5 * jnp.sum((pred - ctx.batch["y"]) ** 2), 0.0)
        return (x, loss), {"x_sum": jnp.sum(x)}

    return stage_fn


def toy_moe_problem(num_stages, num_microbatches, rows, seed=3):
    k = jax.random.split(jax.random.key(seed), 9)
    S, E = num_stages, NUM_EXPERTS
    stage = {"w": jax.random.normal(k[0], (S, D, D)) / np.sqrt(D), "b": jax.random.normal(k[1], (S, D)) / 10,
             "router": jax.random.normal(k[2], (S, D, E)),
             "gate": jax.random.normal(k[3], (S, E, D, FFN)) / np.sqrt(D),
             "up": jax.random.normal(k[4], (S, E, D, FFN)) / np.sqrt(D),
             "down": jax.random.normal(k[5], (S, E, FFN, D)) / np.sqrt(FFN)}
    shared = {"w_in": jax.random.normal(k[6], (IN, D)), "w_out": jax.random.normal(k[7], (D, OUT)) / 4}
    data = jax.random.normal(k[8], (num_microbatches, rows, IN + OUT))
    return stage, shared, {"x": data[..., :IN], "y": data[..., IN:]}, {"stage_marker": jnp.zeros((S,))}


@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def toy_moe_reference(stage, shared, inputs, consts):
    """Un-pipelined, every expert on every row (dense dispatch): (loss, grads, stats [S])."""
    num_stages = consts["stage_marker"].shape[0]
    stage_fn = toy_moe_stage(dense_dispatch)

    def loss_fn(stage, shared):
        total, stats = 0.0, []
        x = jnp.zeros(inputs["x"].shape[:2] + (D,))
        for s in range(num_stages):
            ctx = execute.StageContext(inputs, jnp.int32(s), {}, consts)
            params = {"stage": jax.tree.map(lambda a: a[s], stage), "shared": shared}
            (x, loss), st = jax.vmap(lambda xm, bm: stage_fn(params, xm, ctx._replace(batch=bm)))(x, inputs)
            total, stats = total + loss.sum(), stats + [st["x_sum"].sum()]
        return total, jnp.stack(stats)

    (loss, stats), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(stage, shared)
    return loss, {"stage": grads[0], "shared": grads[1]}, stats


# The executor's side of pipeline x expert parallelism, every schedule on each of the three 8-device
# layouts: each stage's experts split over 'expert' (stage_specs), rows over every non-stage axis, tokens
# moved to the experts by all-to-all inside the pipeline's shard_map; F&B pairs interleaved as the trainer
# runs them. (The real model runs every schedule once below: each of its cases compiles a whole step.)
@pytest.mark.parametrize("stage, data, expert", [(2, 1, 4), (4, 1, 2), (2, 2, 2)])
@pytest.mark.parametrize("name", schedules.SCHEDULES)
def test_toy_moe_pipeline_with_experts_split_in_the_stages_matches_dense(name, stage, data, expert):
    plan = pipelined.make_plan(name, stage, 2 * stage, expert_devices=expert)
    rows = 8  # per micro-batch: 2 per device on every layout
    S, M = plan.schedule.num_stages, plan.schedule.num_microbatches
    params, shared, inputs, consts = toy_moe_problem(S, M, rows)
    in_stage = ExpertParallelInShardMap(ep=expert)
    split = P("expert", None, None)
    specs = {"w": P(), "b": P(), "router": P(), "gate": split, "up": split, "down": split}
    run = jax.jit(lambda st, sh, inp: execute.pipeline_gradients(
        plan, toy_moe_stage(lambda *a: in_stage(*a, None)[0]), st, sh, inp,
        mesh=stage_expert_mesh(stage, data, expert), x_aval=jax.ShapeDtypeStruct((rows, D), jnp.float32),
        consts=consts, stage_specs=specs), compiler_options=FAST_COMPILE)
    with jax.set_mesh(stage_expert_mesh(stage, data, expert)):
        compiled = run.lower(params, shared, inputs).compile(FAST_COMPILE)
    assert "all-to-all" in compiled.as_text()
    result = compiled(params, shared, inputs)
    loss, grads, stats = toy_moe_reference(params, shared, inputs, consts)
    assert_close(result.loss, loss)
    assert_close(result.grads, grads)
    assert_close(result.stats["x_sum"], stats)


PLANNED = [(name, p, m) for p in (4, 8) for m in sorted({2 * p, 16, 20}) for name in schedules.SCHEDULES
           if not (name == "dualpipe" and m < 2 * p) and not (name == "dualpipev" and m < 2 * p)]


@pytest.mark.parametrize("name, ranks, microbatches", PLANNED)
def test_a_hop_costs_one_tick(name, ranks, microbatches):
    """Every computation runs in the first phase its inputs and its rank's previous op allow: an
    activation made in tick t is used from tick t+1, a gradient too, a rank's B may follow its own F
    within a tick; and the tick table is never longer than the unbuffered one-op-per-tick table."""
    schedule = schedules.make_schedule(name, ranks, microbatches)
    plan = build_plan(schedule)
    where = {}  # (kind, direction, micro-batch, stage) -> (tick, rank)
    for t, row in enumerate(plan.phases):
        for r, ops in enumerate(row):
            for half in ops:
                if half is not None:
                    where[(half.kind, half.direction, half.microbatch, half.stage)] = (t, r)
    last = schedule.num_stages - 1

    def earliest(half):
        """The first tick `half`'s inputs allow: an activation or gradient the tick after it was made,
        the rank's own F in the same tick, I's kept gradients the tick after."""
        d, m, s = half.direction, half.microbatch, half.stage
        if half.kind == Kind.FORWARD:
            return where[(Kind.FORWARD, d, m, s - 1)][0] + 1 if s > 0 else 0
        if half.kind == Kind.WEIGHT_GRAD:
            return where[(Kind.INPUT_GRAD, d, m, s)][0] + 1
        grad = where.get((Kind.BACKWARD, d, m, s + 1)) or where.get((Kind.INPUT_GRAD, d, m, s + 1))
        return max(where[(Kind.FORWARD, d, m, s)][0], grad[0] + 1 if s < last else 0)

    for rank_ops in schedule.ops:
        previous = (-1, 1)  # (tick, phase) of the rank's previous computation; phase 0 = forward
        for op in rank_ops:
            halves = op.halves()
            ticks = {where[(h.kind, h.direction, h.microbatch, h.stage)][0] for h in halves}
            assert len(ticks) == 1  # an F&B pair is one tick
            (t,) = ticks
            first_phase = 0 if halves[0].kind == Kind.FORWARD else 1
            after_previous = previous[0] + (first_phase <= previous[1])
            assert t == max([after_previous] + [earliest(h) for h in halves]), (op, t)
            previous = (t, 0 if halves[-1].kind == Kind.FORWARD else 1)
    assert plan.num_ticks <= len(tick_table(schedule, 0))


@pytest.mark.parametrize("name, ranks, microbatches", [c for c in PLANNED if c[0].startswith("dualpipe")])
def test_interleaved_plans_run_each_pair_as_f_and_i_then_w(name, ranks, microbatches):
    """With interleave_pairs every F&B pair of the schedule runs as one forward-phase computation of its F
    and its I, the W of its B in the same tick's backward phase; every other op as without interleaving.
    A pair's I needs its gradient a phase earlier than its B did, which costs at most one tick in all."""
    schedule = schedules.make_schedule(name, ranks, microbatches)
    plan, plain = build_plan(schedule, interleave_pairs=True), build_plan(schedule)
    pairs = [op for ops in schedule.ops for op in ops if op.kind == Kind.OVERLAPPED]
    interleaved = {}
    for row in plan.phases:
        for forward, backward in row:
            if forward is not None and forward.kind == Kind.OVERLAPPED:
                f, i = forward.halves()
                assert i.kind == Kind.INPUT_GRAD
                interleaved[(f.direction, f.microbatch, f.stage, i.direction, i.microbatch, i.stage)] = backward
    assert len(interleaved) == len(pairs)
    for op in pairs:
        f, b = op.halves()
        w = interleaved[(f.direction, f.microbatch, f.stage, b.direction, b.microbatch, b.stage)]
        if b.kind == Kind.BACKWARD:  # its W beside it; an I's W is the schedule's own op
            assert (w.kind, w.direction, w.microbatch, w.stage) == (Kind.WEIGHT_GRAD, b.direction, b.microbatch,
                                                                    b.stage)
    assert plan.num_ticks <= plain.num_ticks + 1
    assert plan.num_stash == plain.num_stash
    assert Branch.PAIR in plan.forward_branches and ("pair_grad", 1) in plan.channels


def test_weight_grad_does_only_the_weight_gradient_matmuls():
    """XLA's cost analysis of B, I and W compiled standalone (no loops, so nothing counted once).
    Wide enough that the matmuls dominate the few elementwise ops (bias sums, masks)."""
    width, rows = 128, 32
    stage, shared, inputs, consts = toy_problem(2, 1, width=width, rows=rows)
    params = {"stage": jax.tree.map(lambda a: a[1], stage), "shared": shared}
    ctx = execute.StageContext(jax.tree.map(lambda a: a[0], inputs), jnp.int32(1), {}, consts)
    x, ct = jnp.ones((rows, width)), jnp.ones((rows, width))
    split = split_stage(toy_stage, params, x, ctx)
    _, _, stash = split.forward(params, x, ctx)
    _, wstash, finished = split.input_grad(params, ctx, stash, ct)
    # I finishes only the weight uses that contract nothing (the biases); every matmul's is W's.
    assert float(jnp.abs(finished["stage"]["b"]).sum()) > 0
    chex.assert_trees_all_close({"w": finished["stage"]["w"], "shared": finished["shared"]},
                                jax.tree.map(jnp.zeros_like, {"w": params["stage"]["w"], "shared": shared}))

    def flops(fn, *args):
        return jax.jit(fn).lower(*args).compile(FAST_COMPILE).cost_analysis()["flops"]

    weight_matmuls = 2 * rows * (LAYERS * width * width + IN * width + width * OUT)  # x^T dy per weight
    w = flops(split.weight_grad, params, ctx, stash, wstash)
    i = flops(split.input_grad, params, ctx, stash, ct)
    b = flops(split.backward, params, ctx, stash, ct)
    assert abs(w - weight_matmuls) <= 0.1 * weight_matmuls, (w, weight_matmuls)
    assert i + w == pytest.approx(b, rel=0.1)  # I + W is B: nothing done twice
    assert i < b - 0.9 * weight_matmuls  # and I really leaves the weight gradients out
    # W's result and what I finished make B's weight gradients.
    d_params, _ = split.backward(params, ctx, stash, ct)
    assert_close(jax.tree.map(jnp.add, split.weight_grad(params, ctx, stash, wstash), finished), d_params)


def test_inseparable_weight_uses_get_their_gradient_in_input_grad():
    """A head under jax.checkpoint (as the pipeline's last stage runs it): I returns its weight's gradient
    itself, W the rest, together B's; nothing parameter-sized waits in the wstash."""
    stage, shared, inputs, consts = toy_problem(2, 1)

    def checkpointed_head(params, x, ctx):
        (x, _), stats = toy_stage(params, x, ctx)
        score = jax.checkpoint(lambda w, h: 0.5 * jnp.sum((h @ w - ctx.batch["y"]) ** 2))
        return (x, score(params["shared"]["w_out"], x)), stats

    params = {"stage": jax.tree.map(lambda a: a[1], stage), "shared": shared}
    ctx = execute.StageContext(jax.tree.map(lambda a: a[0], inputs), jnp.int32(1), {}, consts)
    x, ct = jax.random.normal(jax.random.key(1), (B, D)), jax.random.normal(jax.random.key(2), (B, D))
    split = split_stage(checkpointed_head, params, x, ctx)
    _, _, stash = split.forward(params, x, ctx)
    _, wstash, finished = split.input_grad(params, ctx, stash, ct)
    assert all(a.shape != shared["w_out"].shape for a in split.wstash_avals)
    assert float(jnp.abs(finished["shared"]["w_out"]).sum()) > 0
    d_params, d_x = split.backward(params, ctx, stash, ct)
    summed = jax.tree.map(jnp.add, split.weight_grad(params, ctx, stash, wstash), finished)
    assert_close(summed, d_params)
    # And B itself is the plain gradient.
    def loss(p, xx):
        (y, score), _ = checkpointed_head(p, xx, ctx)
        return score + jnp.sum(y * ct)

    assert_close((d_params, d_x), jax.grad(loss, argnums=(0, 1))(params, x))


@pytest.mark.parametrize("interleave", [False, True])
def test_tick_permutes_are_independent_of_tick_compute(interleave):
    """In the compiled tick (the while body), every collective-permute has a phase's conditional (the
    forward phase for gradients, the backward phase for activations and interleaved pairs' gradients)
    independent of it both ways, so an async collective scheduler can overlap them."""
    schedule = schedules.dualpipe(4, 8)
    stage, shared, inputs, consts = toy_problem(4, 8)
    compiled = jax.jit(lambda st, sh, inp: execute.pipeline_gradients(
        build_plan(schedule, interleave), toy_stage, st, sh, inp, mesh=execute.make_stage_mesh(4),
        x_aval=jax.ShapeDtypeStruct((B, D), jnp.float32), consts=consts)).lower(
        stage, shared, inputs).compile(FAST_COMPILE)
    bodies = [g for g in overlap.computations(compiled.as_text()).values()
              if any(i.opcode.startswith("collective-permute") for i in g.values())
              and any(i.opcode == "conditional" for i in g.values())]
    assert len(bodies) == 1
    body = bodies[0]
    permutes = [n for n, i in body.items() if i.opcode in ("collective-permute", "collective-permute-start")]
    phases = [n for n, i in body.items() if i.opcode == "conditional"]
    # Activations and gradients (and pairs' gradients), both directions; two phases.
    assert len(permutes) == (6 if interleave else 4) and len(phases) == 2
    for p in permutes:
        beside = [c for c in phases if overlap.independent(body, p, c)]
        assert beside, f"{p} depends on, or feeds, every phase's compute"


# ---------------------------------------------------------------------------------------------------
# The real model.


def _recording_optimizer():
    """An optimizer whose state is the last gradient (and which leaves params alone)."""
    return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                        lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    c = micro_run_config(tmp_path_factory.mktemp("pipeline"))
    c.model.update(num_hidden_layers=5, moe_dispatch="dense")  # 1 dense + 4 MoE layers, one per stage
    cfg = ModelConfig.from_dict(c.model)
    tx = _recording_optimizer()
    state = step_lib.init_state(cfg, tx, jax.random.key(0))
    batch_rows, length = 16, 16
    tokens = jax.random.randint(jax.random.key(1), (batch_rows, length), 0, cfg.vocab_size)
    segments = jnp.ones_like(tokens).at[1, 10:].set(2).at[3, 12:].set(0)  # two documents, padding
    batch = {"tokens": tokens, "segment_ids": segments,
             "positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)}
    ref = jax.jit(functools.partial(step_lib.train_step, cfg=cfg, train_cfg=c.train, tx=tx),
                  compiler_options=FAST_COMPILE)(state, batch)
    return c, cfg, tx, state, batch, ref


# Every schedule with the real model, on 4 and on 8 devices (each case compiles a whole pipelined step,
# so not every combination: the toy tests above take every schedule through every mesh).
@pytest.mark.parametrize("name, stage, data, microbatches", [
    ("1f1b", 4, 1, 8), ("dualpipe", 4, 1, 8),  # 4 devices
    ("dualpipe", 4, 2, 8),  # 8 devices: 1 row per device and micro-batch
    ("gpipe", 2, 4, 4), ("zb_h1", 2, 4, 4), ("dualpipev", 2, 4, 4)])  # 8 devices, 4 stages
def test_real_model_train_step_matches_unpipelined(micro, name, stage, data, microbatches):
    """Gradients (through a recording optimizer), bias update and every metric of the un-pipelined
    step on one device, within 1e-5 relative."""
    c, cfg, tx, state, batch, (ref_state, ref_metrics) = micro
    mesh = execute.make_stage_mesh(stage) if data == 1 else stage_data_mesh(stage, data)
    step = pipelined.make_pipelined_step(cfg, c.train, tx, name, num_ranks=stage, num_microbatches=microbatches,
                                      mesh=mesh)
    new_state, metrics = jax.jit(step, compiler_options=FAST_COMPILE)(state, batch)
    assert_close(new_state.opt_state, ref_state.opt_state)  # the gradients (recording optimizer)
    assert_close(new_state.routing, ref_state.routing)  # loss-free bias update from summed expert counts
    assert set(metrics) == set(ref_metrics)
    assert_close({k: metrics[k] for k in ref_metrics if k != "finite"},
                 {k: ref_metrics[k] for k in ref_metrics if k != "finite"})


@pytest.fixture(scope="module")
def experts_run(micro):
    """(name, stage, data, expert, micro-batches) -> (optimized HLO text, new state, metrics) of the
    pipelined step with each stage's experts split over 'expert' (each layout compiled once)."""
    c, cfg, tx, state, batch, _ = micro
    runs = {}

    def run(name, stage, data, expert, microbatches):
        key = (name, stage, data, expert, microbatches)
        if key not in runs:
            mesh = stage_expert_mesh(stage, data, expert)
            step = pipelined.make_pipelined_step(cfg.replace(moe_dispatch="ep"), c.train, tx, name, num_ranks=stage,
                                                 num_microbatches=microbatches, mesh=mesh)
            with jax.set_mesh(mesh):
                compiled = jax.jit(step, compiler_options=FAST_COMPILE).lower(state, batch).compile(FAST_COMPILE)
                runs[key] = (compiled.as_text(), *compiled(state, batch))
        return runs[key]

    return run


# Expert parallelism inside the stages (each stage's 4 routed experts split over 'expert', tokens moved by
# all-to-all inside the pipeline's shard_map), every schedule once over the three 8-device layouts. The
# DualPipe schedules run their F&B pairs interleaved (the default with an 'expert' axis).
@pytest.mark.parametrize("name, stage, data, expert, microbatches", [
    ("dualpipe", 2, 1, 4, 4), ("1f1b", 4, 1, 2, 4), ("zb_h1", 2, 2, 2, 4), ("gpipe", 2, 1, 4, 4),
    ("dualpipev", 2, 2, 2, 4)])
def test_real_model_with_experts_split_in_the_stages_matches_dense(micro, experts_run, name, stage, data, expert,
                                                                     microbatches):
    """Pipeline x expert (x data) parallelism against the single-device dense-dispatch step: gradients,
    bias update and every metric within 1e-5 relative, dropless."""
    *_, (ref_state, ref_metrics) = micro
    hlo, new_state, metrics = experts_run(name, stage, data, expert, microbatches)
    assert "all-to-all" in hlo  # The experts really are reached by all-to-all.
    assert_close(new_state.opt_state, ref_state.opt_state)
    assert_close(new_state.routing, ref_state.routing)
    assert set(metrics) == set(ref_metrics)
    assert_close({k: metrics[k] for k in ref_metrics if k != "finite"},
                 {k: ref_metrics[k] for k in ref_metrics if k != "finite"})


def test_interleaved_pair_all_to_alls_have_the_other_halfs_compute_beside_them(experts_run):
    """The compiled F&B pair of a DualPipe step (stage=2 x expert=4, two MoE layers per stage): every
    all-to-all of the forward half (dispatch, combine) is independent, both ways, of matmuls of the
    input-gradient half in the same computation, and every all-to-all of the input-gradient half of
    matmuls of the forward half. The stage's layers' all-to-alls are instructions of the pair's own
    computation (what a scheduler can overlap); the MTP module's, which only the last stage runs, sit
    inside the head's conditional, which is independent of the other half as a whole."""
    hlo, *_ = experts_run("dualpipe", 2, 1, 4, 4)
    found = overlap.pair_all_to_alls(overlap.computations(hlo), execute.PAIR_FORWARD, execute.PAIR_INPUT_GRAD)
    for a in found:  # the listing the issue asks for (pytest -s shows it)
        print(f"{a.half:16s} {a.name:16s} {a.via or '':16s} {a.layer[-48:]:48s} beside {len(a.independent_compute)} "
              f"matmul ops of the other half")
    graph = overlap.computations(hlo)[found[0].computation]
    layers = [a for a in found if a.via is None]
    nested = [a for a in found if a.via is not None]
    # Two MoE layers x (dispatch, combine) in each half at least, all in the pair's own computation.
    for half in (execute.PAIR_FORWARD, execute.PAIR_INPUT_GRAD):
        assert sum(a.half == half for a in layers) >= 4
    assert all("mtp" in a.layer and graph[a.via].opcode == "conditional" for a in nested)
    assert all(a.independent_compute for a in found), [a.name for a in found if not a.independent_compute]


@dataclasses.dataclass(frozen=True)
class PipelineDropsReference:
    """The reference for a pipelined expert-parallel step with a capacity: every expert on every token
    (dense), the (token, expert) pairs a pipeline device would drop left out. Which pairs those are is
    NumPy's: the source devices are the pipeline's (micro-batch m = rows m, m+M, ..., its b rows split in
    contiguous blocks over R data shards), each sends its pairs in (token, k) order, and a destination
    device keeps the first C = ceil(capacity_factor x n x K / ep) of them (n = the source's tokens)."""

    microbatches: int
    shards: int
    seq_len: int
    ep: int
    capacity_factor: float

    def experts_held(self, num_experts: int) -> int:
        return num_experts

    def kept(self, indices_NK: np.ndarray, num_experts: int) -> np.ndarray:
        N, K = indices_NK.shape
        rows, M, T = N // self.seq_len, self.microbatches, self.seq_len
        per_shard = rows // M // self.shards
        C = math.ceil(self.capacity_factor * per_shard * T * K / self.ep)
        kept = np.ones((N, K), bool)
        for m in range(M):
            for shard in range(self.shards):
                seen = np.zeros(self.ep, int)
                for p in range(shard * per_shard, (shard + 1) * per_shard):
                    for t in range((m + p * M) * T, (m + p * M + 1) * T):
                        for k in range(K):
                            dest = indices_NK[t, k] // (num_experts // self.ep)
                            kept[t, k] = seen[dest] < C
                            seen[dest] += 1
        return kept

    def __call__(self, x_ND, weights_NK, indices_NK, w, recipe):
        kept = jax.pure_callback(lambda idx: self.kept(np.asarray(idx), w[0].shape[0]),
                                 jax.ShapeDtypeStruct(indices_NK.shape, jnp.bool_), indices_NK)
        y = dense_dispatch(x_ND, jnp.where(kept, weights_NK, 0), indices_NK, w)
        return y, jnp.sum(~kept).astype(jnp.float32)


def test_pipelined_capacity_drops_match_numpy(micro, monkeypatch):
    """DualPipe (pairs interleaved) on stage=2 x expert=4 with capacity factor 0.5: the dropped pairs of
    every MoE layer and MTP block, summed through the pipeline, equal the NumPy count on the same routing,
    and gradients, bias update and metrics equal the dense single-device step without those pairs."""
    c, cfg, tx, state, batch, _ = micro
    capped = cfg.replace(moe_dispatch="ep", moe_capacity_factor=0.5)
    mesh = stage_expert_mesh(2, 1, 4)
    step = pipelined.make_pipelined_step(capped, c.train, tx, "dualpipe", num_ranks=2, num_microbatches=4, mesh=mesh)
    with jax.set_mesh(mesh):
        new_state, metrics = jax.jit(step, compiler_options=FAST_COMPILE)(state, batch)
    reference = PipelineDropsReference(microbatches=4, shards=4, seq_len=batch["tokens"].shape[1], ep=4,
                                       capacity_factor=0.5)
    monkeypatch.setattr(dispatch_lib, "implementation", lambda _: reference)
    ref_state, ref_metrics = jax.jit(functools.partial(step_lib.train_step, cfg=capped, train_cfg=c.train, tx=tx),
                                     compiler_options=FAST_COMPILE)(state, batch)
    assert float(metrics["dropped_pairs"]) == float(ref_metrics["dropped_pairs"]) > 0
    assert_close(new_state.opt_state, ref_state.opt_state)
    assert_close(new_state.routing, ref_state.routing)
    assert_close({k: metrics[k] for k in ref_metrics if k != "finite"},
                 {k: ref_metrics[k] for k in ref_metrics if k != "finite"})


def test_pipelined_experts_with_node_limit_and_fp8_payload_match_one_device(micro):
    """DualPipe (pairs interleaved) on stage=2 x expert=4 with node-limited routing (each token's experts
    within one of 2 device groups) and the FP8 recipe (the dispatch payload quantised before the
    all-to-all): loss, metrics and bias update equal the one-device FP8 step (Fprop is row-wise) within
    1e-5; gradients only within FP8 rounding, since Wgrad tiles each device's and micro-batch's token rows
    on their own (tests/test_fp8_experts.py; measured: 4% of the largest entry on the experts' down_proj,
    0.2% on the dense layers)."""
    c, cfg, tx, state, batch, _ = micro
    limited = cfg.replace(n_group=1, topk_group=1, node_groups=2, node_limit=1)
    recipe = Fp8Recipe(tile=16)
    mesh = stage_expert_mesh(2, 1, 4)
    step = pipelined.make_pipelined_step(limited.replace(moe_dispatch="ep"), c.train, tx, "dualpipe", num_ranks=2,
                                         num_microbatches=4, recipe=recipe, mesh=mesh)
    with jax.set_mesh(mesh):
        lowered = jax.jit(step, compiler_options=FAST_COMPILE).lower(state, batch)
        new_state, metrics = lowered.compile(FAST_COMPILE)(state, batch)
    # The program as JAX emits it sends FP8 rows (XLA:CPU then widens FP8 collectives to f16 in the
    # compiled program, so the check reads the lowered one).
    assert any("xf8E4M3FN>" in line for line in lowered.as_text().splitlines() if "stablehlo.all_to_all" in line)
    ref_state, ref_metrics = jax.jit(functools.partial(
        step_lib.train_step, cfg=limited.replace(moe_dispatch="ragged"), train_cfg=c.train, tx=tx, recipe=recipe),
        compiler_options=FAST_COMPILE)(state, batch)
    assert_close(new_state.routing, ref_state.routing)
    exact = [k for k in ref_metrics if k not in ("finite", "grad_norm")]
    assert_close({k: metrics[k] for k in exact}, {k: ref_metrics[k] for k in exact})
    assert_close(new_state.opt_state, ref_state.opt_state, rtol=0.1)


def test_rejects_bad_configurations(micro):
    c, cfg, tx, *_ = micro
    with pytest.raises(ValueError, match="MoE layers evenly over 8 stages"):
        pipelined.make_pipelined_step(cfg, c.train, tx, "dualpipev", num_ranks=4, num_microbatches=8)
    with pytest.raises(ValueError, match="ranks but mesh axis"):
        execute.pipeline_gradients(schedules.gpipe(2, 2), toy_stage, {}, {}, {}, mesh=execute.make_stage_mesh(4),
                                   x_aval=jax.ShapeDtypeStruct((1,), jnp.float32))
