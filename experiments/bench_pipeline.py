"""Lock-step idle time and activation memory of the shard_map pipeline executor, per schedule.

For GPipe, 1F1B, ZB-H1, DualPipe and DualPipeV on 8 simulated CPU devices, running a small
DeepSeek-V3 (1 dense + 16 MoE layers, MTP depth 1) with M = 16 micro-batches:

  op costs            F, B, I and W of one stage, each compiled and timed alone on one device (the
                      fastest of --repeats runs, interleaved with the other ops), at the first, a
                      middle and the last stage (the first adds the embedding and the dense layer, the
                      last the head, MTP and losses); an overlapped F&B pair costs F + B (CPU runs the
                      pair's halves one after the other);
  lock-step idle      the executor's plan (tables.py: a forward and a backward phase per tick) costed
                      with those numbers, each phase as long as its slowest rank's op:
                      idle = 1 - sum(busy) / (P * makespan); beside it the one-op-per-tick tables the
                      executor ran before (sends overlapped with the next tick, or sent after compute);
  asynchronous        the simulator's asynchronous timeline of the same schedule with the same measured
                      per-stage costs (every op as soon as its inputs are there, no lock step): its
                      makespan, the schedule's own lower bound, against the executor's (the main
                      figure), and its bubble (mean over ranks of bubble / total time); also the ratio
                      this benchmark reported first, (1 - ideal bubble) / (1 - lock-step idle) with the
                      ideal bubble simulated with the middle-stage costs only;
  memory              per device: the train state's parameters + Adam moments as the trainer shards them
                      on a ('stage',) mesh of 8 ranks (and as they were before the shared parameters were
                      split over 'stage'), `compiled.memory_analysis()` of the whole pipelined gradient
                      program in those shardings (temporaries hold the activation stash and every other
                      buffer), and the executor's stash (residuals kept from F to B/W) from its shape.

CPU XLA runs collective-permutes synchronously, so communication overlap is not measured here.
Writes experiments/results/bench_pipeline.{json,md}. Run: python experiments/bench_pipeline.py
(about 6 minutes on 2 cores).
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from deepseek_jax import defaults  # noqa: E402
from deepseek_jax.model import functional  # noqa: E402
from deepseek_jax.model.config import ModelConfig  # noqa: E402
from deepseek_jax.model.transformer import default_positions  # noqa: E402
from deepseek_jax.parallel import mesh as mesh_lib  # noqa: E402
from deepseek_jax.parallel.pipeline import execute, schedules  # noqa: E402
from deepseek_jax.parallel.pipeline.backward_split import split_stage  # noqa: E402
from deepseek_jax.parallel.pipeline.schedules import Kind  # noqa: E402
from deepseek_jax.parallel.pipeline.simulate import CostModel, simulate, tick_table  # noqa: E402
from deepseek_jax.parallel.pipeline.tables import build_plan  # noqa: E402
from deepseek_jax.train import pipelined, placement  # noqa: E402
from deepseek_jax.train import step as step_lib  # noqa: E402
from deepseek_jax.train.optimizer import make_optimizer  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
_OUT_DIR = flags.DEFINE_string("out_dir", str(ROOT / "experiments" / "results"), "Where to write the results.")
_REPEATS = flags.DEFINE_integer("repeats", 30, "Timed runs per op, interleaved (the fastest is kept).")

RANKS, MICROBATCHES, ROWS, LENGTH = 8, 16, 2, 64
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def model_config() -> tuple[ModelConfig, object]:
    c = defaults.load_config(str(ROOT / "configs" / "tiny.py") + ":mtp=1")
    c.model.update(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=17,
                   num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                   qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_group=4, topk_group=2,
                   num_experts_per_tok=2, max_position_embeddings=LENGTH)
    return ModelConfig.from_dict(c.model), c.train


def batch_for(cfg: ModelConfig):
    tokens = jax.random.randint(jax.random.key(1), (ROWS * MICROBATCHES, LENGTH), 0, cfg.vocab_size)
    return {"tokens": tokens, "positions": default_positions(tokens), "segment_ids": jnp.ones_like(tokens)}


def _fastest_seconds(calls: dict) -> dict:
    """{name: seconds} of each zero-argument call, timed in interleaved rounds, fastest run kept.

    Interleaving spreads any drift of the machine over every op alike, and the fastest of the runs is
    the op's uncontended cost (slower runs are interference from other threads; medians of consecutive
    runs moved the idle fractions by up to 14 points between identical runs).
    """
    for call in calls.values():
        jax.block_until_ready(call())
    best = {name: float("inf") for name in calls}
    for _ in range(_REPEATS.value):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def op_costs(cfg, train_cfg, variables, num_stages: int) -> dict:
    """{kind: {'first'|'middle'|'last': seconds}} for one stage of `num_stages`, timed alone."""
    stage_params, shared, stage_routing, shared_routing = pipelined.split_variables(
        variables["params"], variables["routing"], num_stages)
    stage_fn = pipelined.make_stage_fn(cfg, num_stages, 1.0 / MICROBATCHES, train_cfg.balance_alpha)
    batch = jax.tree.map(lambda a: a[:ROWS], batch_for(cfg))
    consts = {"routing": shared_routing, "main_count": jnp.float32(ROWS * LENGTH),
              "mtp_counts": jnp.full((cfg.num_nextn_predict_layers,), float(ROWS * LENGTH)),
              "mtp_weight": jnp.float32(0.3)}
    x = jnp.ones((ROWS, LENGTH, cfg.hidden_size), jnp.float32) * 0.1

    def ctx_of(s):
        return execute.StageContext(batch, jnp.int32(s), jax.tree.map(lambda a: a[s], stage_routing), consts)

    def params_of(s):
        return {"stage": jax.tree.map(lambda a: a[s], stage_params), "shared": shared}

    split = split_stage(stage_fn, params_of(0), x, ctx_of(0))
    forward = jax.jit(split.forward)
    backward = jax.jit(split.backward)
    input_grad = jax.jit(split.input_grad)
    weight_grad = jax.jit(split.weight_grad)
    calls = {}
    for where, s in (("first", 0), ("middle", num_stages // 2), ("last", num_stages - 1)):
        params, ctx = params_of(s), ctx_of(s)
        _, _, stash = forward(params, x, ctx)
        _, wstash, _ = input_grad(params, ctx, stash, x)
        calls["F", where] = functools.partial(forward, params, x, ctx)
        calls["B", where] = functools.partial(backward, params, ctx, stash, x)
        calls["I", where] = functools.partial(input_grad, params, ctx, stash, x)
        calls["W", where] = functools.partial(weight_grad, params, ctx, stash, wstash)
    costs = {k: {} for k in "FBIW"}
    for (kind, where), seconds in _fastest_seconds(calls).items():
        costs[kind][where] = seconds
    return costs


def stage_cost(schedule, costs: dict):
    """The measured cost of one computation (F, B, I or W) at its stage's position."""
    kind = {Kind.FORWARD: "F", Kind.BACKWARD: "B", Kind.INPUT_GRAD: "I", Kind.WEIGHT_GRAD: "W"}
    where = lambda s: "first" if s == 0 else "last" if s == schedule.num_stages - 1 else "middle"  # noqa: E731
    return lambda half: costs[kind[half.kind]][where(half.stage)]


def asynchronous(schedule, costs: dict):
    """The simulator's asynchronous timeline with the same per-stage costs (a pair costs its two halves:
    CPU runs them one after the other)."""
    cost = stage_cost(schedule, costs)
    return simulate(schedule, CostModel(), duration=lambda op: sum(cost(h) for h in op.halves()))


def lockstep(schedule, plan, costs: dict) -> dict:
    """Idle fraction and makespan of the executor's plan against the asynchronous timeline with the same
    per-stage op costs, and the idle of the one-op-per-tick tables the executor ran before."""
    cost = stage_cost(schedule, costs)
    total, ops = plan.timeline(cost)
    busy = sum(t.end - t.start for rank_ops in ops for t in rank_ops)
    ideal = asynchronous(schedule, costs)
    out = {"ticks": plan.num_ticks, "seconds": total, "idle_fraction": float(1 - busy / (schedule.num_ranks * total)),
           "async_seconds": ideal.total_time, "makespan_over_async": total / ideal.total_time,
           "async_bubble_fraction": float(np.mean(ideal.bubble) / ideal.total_time)}
    # The same with every stage costing what a middle stage does: the end stages' extra work (embedding,
    # dense layer, head, MTP, losses) taken out of both sides.
    middle = middle_costs(costs)
    uniform_total, uniform_ops = plan.timeline(stage_cost(schedule, middle))
    uniform_busy = sum(t.end - t.start for rank_ops in uniform_ops for t in rank_ops)
    out["idle_fraction_uniform_costs"] = float(1 - uniform_busy / (schedule.num_ranks * uniform_total))
    out["makespan_over_async_uniform_costs"] = uniform_total / asynchronous(schedule, middle).total_time
    for latency, name in ((1, "before_overlapped"), (0, "before_unbuffered")):
        ticks = tick_table(schedule, latency)
        seconds = sum(max(sum(cost(h) for h in op.halves()) if op else 0.0 for op in row) for row in ticks)
        out[f"ticks_{name}"] = len(ticks)
        out[f"idle_fraction_{name}"] = float(1 - busy / (schedule.num_ranks * seconds))
    return out


def middle_costs(costs: dict) -> dict:
    """The measured costs with every stage costing what a middle stage does."""
    return {k: {w: c["middle"] for w in c} for k, c in costs.items()}


def ideal_bubble(schedule, costs: dict) -> float:
    """The asynchronous bubble (mean over ranks) with the middle-stage costs: the first measure's ideal."""
    timeline = asynchronous(schedule, middle_costs(costs))
    return float(np.mean(timeline.bubble) / timeline.total_time)


def stage_mesh():
    return mesh_lib.make_mesh(ml_collections.ConfigDict(dict(stage=RANKS, data=1, expert=1, tensor=1)))


def state_bytes(cfg, train_cfg) -> dict:
    """Per-device bytes of parameters + Adam moments as the trainer lays them out on the pipeline's mesh,
    and with only the MoE stack split over 'stage' (the layout before the shared parameters were)."""
    mesh, tx = stage_mesh(), make_optimizer(train_cfg)
    abstract = jax.eval_shape(lambda: step_lib.init_state(cfg, tx, jax.random.key(0)))
    now = placement.state_shardings(cfg, tx, mesh)
    rules_only = mesh_lib.param_shardings(functional.logical_axes(cfg)["params"], mesh)
    before_opt = mesh_lib.opt_state_shardings(tx, abstract.opt_state, rules_only, mesh)

    def per_device(tree, shardings):
        leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize for a, s in zip(jax.tree.leaves(tree), leaves))

    total = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves((abstract.params, abstract.opt_state)))
    return {"state_bytes_total": total,
            "state_bytes_per_device": per_device((abstract.params, abstract.opt_state), (now.params, now.opt_state)),
            "state_bytes_per_device_before": per_device((abstract.params, abstract.opt_state),
                                                        (rules_only, before_opt))}


def memory(cfg, train_cfg, variables, plan) -> dict:
    """Per-device memory of the compiled pipelined gradient program in the trainer's shardings, and the
    stash's share."""
    mesh = stage_mesh()
    shardings = placement.variable_shardings(cfg, mesh)
    batch = batch_for(cfg)
    step = jnp.int32(0)
    fn = jax.jit(lambda p, r, b: pipelined.pipelined_grads(p, r, b, step, cfg=cfg, train_cfg=train_cfg, plan=plan,
                                                        mesh=mesh),
                 in_shardings=(shardings["params"], shardings["routing"], None))
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = fn.lower(variables["params"], variables["routing"], batch).compile(FAST_COMPILE)
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    # The stash entry's size, from the split of one stage (what the executor allocates per slot).
    S = plan.schedule.num_stages
    stage_params, shared, stage_routing, shared_routing = pipelined.split_variables(
        variables["params"], variables["routing"], S)
    stage_fn = pipelined.make_stage_fn(cfg, S, 1.0 / MICROBATCHES, train_cfg.balance_alpha)
    mb = jax.tree.map(lambda a: a[:ROWS], batch)
    ctx = execute.StageContext(mb, jnp.int32(0), jax.tree.map(lambda a: a[0], stage_routing),
                               {"routing": shared_routing, "main_count": jnp.float32(1), "mtp_counts": jnp.ones((1,)),
                                "mtp_weight": jnp.float32(0.3)})
    split = split_stage(stage_fn, {"stage": jax.tree.map(lambda a: a[0], stage_params), "shared": shared},
                        jnp.zeros((ROWS, LENGTH, cfg.hidden_size)), ctx)
    entry = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in split.stash_avals)
    return {"compile_seconds": seconds, "temp_bytes": stats.temp_size_in_bytes,
            "argument_bytes": stats.argument_size_in_bytes, "output_bytes": stats.output_size_in_bytes,
            "stash_slots": plan.num_stash, "stash_entry_bytes": entry, "stash_bytes": plan.num_stash * entry}


def main(argv) -> None:
    del argv
    started = time.perf_counter()
    cfg, train_cfg = model_config()
    variables = functional.init(cfg, jax.random.key(0))
    costs = {}
    rows = []
    for name in ("gpipe", "1f1b", "zb_h1", "dualpipe", "dualpipev"):
        schedule = schedules.make_schedule(name, RANKS, MICROBATCHES)
        S = schedule.num_stages
        if S not in costs:
            costs[S] = op_costs(cfg, train_cfg, variables, S)
            print(f"op costs with {S} stages (ms):",
                  {k: {w: round(1e3 * v, 2) for w, v in c.items()} for k, c in costs[S].items()}, flush=True)
        plan = build_plan(schedule)
        row = {"schedule": name, "stages": S, **lockstep(schedule, plan, costs[S]),
               "ideal_bubble_fraction": ideal_bubble(schedule, costs[S]),
               "simulated_peak_activations": max(simulate(schedule, CostModel()).peak_activations),
               **memory(cfg, train_cfg, variables, plan)}
        row["makespan_over_ideal"] = (1 - row["ideal_bubble_fraction"]) / (1 - row["idle_fraction"])
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    out = pathlib.Path(_OUT_DIR.value)
    out.mkdir(parents=True, exist_ok=True)
    result = {"ranks": RANKS, "microbatches": MICROBATCHES, "rows_per_microbatch": ROWS, "length": LENGTH,
              **state_bytes(cfg, train_cfg),
              "model": {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "n_routed_experts",
                                                       "num_nextn_predict_layers", "vocab_size")},
              "op_cost_seconds": {str(k): v for k, v in costs.items()}, "schedules": rows,
              "device": jax.devices()[0].device_kind, "seconds": time.perf_counter() - started}
    (out / "bench_pipeline.json").write_text(json.dumps(result, indent=2))
    lines = [f"Pipeline executor on {RANKS} simulated CPU devices, M = {MICROBATCHES} micro-batches of "
             f"{ROWS} x {LENGTH} tokens, DeepSeek-V3 micro model (1 dense + 16 MoE layers, MTP 1).", "",
             "| schedule | stages | ticks | lock-step idle | async bubble, same costs | makespan / async | "
             "same, middle-stage costs | first measure: vs middle-cost ideal | "
             "before: idle (ticks), overlapped | before: idle (ticks), unbuffered | "
             "stash slots (sim. peak) | stash MiB | compiled temp MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['schedule']} | {r['stages']} | {r['ticks']} | {r['idle_fraction']:.1%} | "
                     f"{r['async_bubble_fraction']:.1%} | **{r['makespan_over_async']:.2f}x** | "
                     f"{r['makespan_over_async_uniform_costs']:.2f}x | {r['makespan_over_ideal']:.2f}x "
                     f"({r['ideal_bubble_fraction']:.1%}) | {r['idle_fraction_before_overlapped']:.1%} "
                     f"({r['ticks_before_overlapped']}) | {r['idle_fraction_before_unbuffered']:.1%} "
                     f"({r['ticks_before_unbuffered']}) | "
                     f"{r['stash_slots']} ({r['simulated_peak_activations']}) | {r['stash_bytes'] / 2**20:.2f} | "
                     f"{r['temp_bytes'] / 2**20:.2f} |")
    mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
    share = result["state_bytes_per_device"] * RANKS / result["state_bytes_total"]
    lines += ["", f"Parameters + Adam moments per device on the 8 ranks: {mib(result['state_bytes_per_device'])} "
              f"(total {mib(result['state_bytes_total'])}, so {share:.2f}x total / P); with only the MoE stack "
              "split over 'stage', as before: "
              f"{mib(result['state_bytes_per_device_before'])}.", "",
              "Lock-step idle: the executor's plan (two phases per tick, a hop to a neighbour takes one tick and "
              "every send travels while the other phase computes) with each phase as long as its slowest rank's "
              "op, op costs timed alone per stage position. Before: the one-op-per-tick tables the executor ran "
              "until this change, with sends overlapped with the next tick (two ticks per hop) or sent after "
              "compute (no overlap). Makespan / async: the executor's makespan over the simulator's "
              "asynchronous makespan of the same schedule with the same measured per-stage costs (async bubble: "
              "its mean idle share of a rank), i.e. what lock step costs; 'same, middle-stage costs': both "
              "with every stage costing a middle stage's ops, the end stages' extra work (embedding and dense "
              "layer; head, MTP, losses) taken out. First measure: (1 - ideal bubble) / (1 - lock-step idle) "
              "with the ideal simulated with middle-stage costs only (in parentheses), as this benchmark "
              "first reported it; it charges the end stages' extra work, which an asynchronous executor pays "
              "too, to lock step. Stash: residuals kept "
              "from F to B/W, per rank (`sim. peak`: the simulator's peak activation units with its default "
              "costs). Memory per device from `compiled.memory_analysis()` in the trainer's shardings."]
    (out / "bench_pipeline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
