"""The shard_map pipeline executor: pipelined == un-pipelined, W without the input chain, overlap in HLO.

A toy MLP stage (as in the DualPipe reference's tests) proves every schedule on 4 and 8 simulated
devices, alone and with data parallelism; the micro DeepSeek-V3 proves the cut into stages and the
train step for every schedule, on 'stage'-only meshes and on ('stage', 'data') meshes of 8 devices.
Programs are compiled with XLA's CPU backend optimisations off: compile time dominates here.
"""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from common import micro_run_config

from deepseek_jax.model.config import ModelConfig
from deepseek_jax.parallel import mesh as mesh_lib
from deepseek_jax.parallel.pipeline import execute, schedules
from deepseek_jax.parallel.pipeline.backward_split import split_stage
from deepseek_jax.parallel.pipeline.schedules import Kind
from deepseek_jax.parallel.pipeline.simulate import CostModel, peak_activations, tick_table
from deepseek_jax.parallel.pipeline.tables import build_plan, op_cost
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


@pytest.mark.parametrize("num_ranks", [4, 8])
@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb_h1", "dualpipe", "dualpipev"])
def test_toy_pipeline_matches_unpipelined(name, num_ranks):
    schedule = schedules.make_schedule(name, num_ranks, 2 * num_ranks)
    plan = build_plan(schedule)
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


def _hlo_computations(text):
    """{computation name: {instruction: (opcode, [operand names])}} from optimized HLO text."""
    comps, current = {}, None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if header:
            current = comps.setdefault(header.group(1), {})
            continue
        m = re.match(r"^\s*(?:ROOT )?%(\S+) = (.*)$", line)
        if current is None or not m:
            continue
        rest = m.group(2)
        if rest.startswith("("):  # tuple type: skip to its closing parenthesis
            depth = 0
            for j, ch in enumerate(rest):
                depth += {"(": 1, ")": -1}.get(ch, 0)
                if depth == 0:
                    rest = rest[j + 1:]
                    break
        op = re.match(r"\s*(?:\S+\s+)?([a-z][\w\-]*)\(", rest)
        depth, args = 0, ""
        for ch in rest[op.end() - 1:]:
            depth += {"(": 1, ")": -1}.get(ch, 0)
            args += ch
            if depth == 0:
                break
        control = re.search(r"control-predecessors=\{([^}]*)\}", rest)  # ordering edges count too
        current[m.group(1)] = (op.group(1), re.findall(r"%([\w\.\-]+)", args + (control.group(1) if control else "")))
    return comps


def _ancestors(graph, name):
    seen, todo = set(), [name]
    while todo:
        for parent in graph.get(todo.pop(), (None, []))[1]:
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


def test_tick_permutes_are_independent_of_tick_compute():
    """In the compiled tick (the while body), every collective-permute has a phase's conditional (the
    forward phase for gradients, the backward phase for activations) independent of it both ways, so an
    async collective scheduler can overlap them."""
    schedule = schedules.dualpipe(4, 8)
    stage, shared, inputs, consts = toy_problem(4, 8)
    compiled = jax.jit(lambda st, sh, inp: execute.pipeline_gradients(
        build_plan(schedule), toy_stage, st, sh, inp, mesh=execute.make_stage_mesh(4),
        x_aval=jax.ShapeDtypeStruct((B, D), jnp.float32), consts=consts)).lower(
        stage, shared, inputs).compile(FAST_COMPILE)
    bodies = [g for g in _hlo_computations(compiled.as_text()).values()
              if any(op.startswith("collective-permute") for op, _ in g.values())
              and any(op == "conditional" for op, _ in g.values())]
    assert len(bodies) == 1
    body = bodies[0]
    permutes = [n for n, (op, _) in body.items() if op in ("collective-permute", "collective-permute-start")]
    phases = [n for n, (op, _) in body.items() if op == "conditional"]
    assert len(permutes) == 4 and len(phases) == 2  # activations and gradients, both directions; two phases
    for p in permutes:
        beside = [c for c in phases if c not in _ancestors(body, p) and p not in _ancestors(body, c)]
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


def stage_expert_mesh(stage: int, data: int, expert: int):
    return mesh_lib.make_mesh(ml_collections.ConfigDict(dict(stage=stage, data=data, expert=expert, tensor=1)))


# Expert parallelism inside the stages (each stage's 4 routed experts split over 'expert', tokens moved by
# all-to-all inside the pipeline's shard_map), every schedule once over the three 8-device layouts.
@pytest.mark.parametrize("name, stage, data, expert, microbatches", [
    ("dualpipe", 2, 1, 4, 4), ("1f1b", 4, 1, 2, 4), ("zb_h1", 2, 2, 2, 4), ("gpipe", 2, 1, 4, 4),
    ("dualpipev", 2, 2, 2, 4)])
def test_real_model_with_experts_split_in_the_stages_matches_dense(micro, name, stage, data, expert, microbatches):
    """Pipeline x expert (x data) parallelism against the single-device dense-dispatch step: gradients,
    bias update and every metric within 1e-5 relative, dropless."""
    c, cfg, tx, state, batch, (ref_state, ref_metrics) = micro
    mesh = stage_expert_mesh(stage, data, expert)
    step = pipelined.make_pipelined_step(cfg.replace(moe_dispatch="ep"), c.train, tx, name, num_ranks=stage,
                                         num_microbatches=microbatches, mesh=mesh)
    with jax.set_mesh(mesh):
        hlo = jax.jit(step, compiler_options=FAST_COMPILE).lower(state, batch)
        new_state, metrics = hlo.compile(FAST_COMPILE)(state, batch)
    assert "all_to_all" in hlo.as_text()  # The experts really are reached by all-to-all.
    assert_close(new_state.opt_state, ref_state.opt_state)
    assert_close(new_state.routing, ref_state.routing)
    assert set(metrics) == set(ref_metrics)
    assert_close({k: metrics[k] for k in ref_metrics if k != "finite"},
                 {k: ref_metrics[k] for k in ref_metrics if k != "finite"})


def test_rejects_bad_configurations(micro):
    c, cfg, tx, *_ = micro
    with pytest.raises(ValueError, match="MoE layers evenly over 8 stages"):
        pipelined.make_pipelined_step(cfg, c.train, tx, "dualpipev", num_ranks=4, num_microbatches=8)
    with pytest.raises(ValueError, match="ranks but mesh axis"):
        execute.pipeline_gradients(schedules.gpipe(2, 2), toy_stage, {}, {}, {}, mesh=execute.make_stage_mesh(4),
                                   x_aval=jax.ShapeDtypeStruct((1,), jnp.float32))
